"""Peak resident memory of `segment` on a volume does not grow with the volume.

Writes uint8 OME-Zarr volumes (NGFF 0.5, zarr v3, zstd) chunk by chunk, never
whole in memory: 128 x 512 x 512 (34 Mvox) and 512 x 2048 x 2048 (2.1 Gvox,
about 2 GB on disk). Each is segmented in a fresh process, OME-Zarr on disk to
an OME-Zarr of labels on disk, and the process's peak RSS (ru_maxrss, imports
included) is recorded with the wall time. Output:
results/memory_scaling_3d.{csv,json,png} (``--name`` changes the name).

    python benchmarks/memory_scaling_3d.py [--sizes 128x512x512,512x2048x2048]
                                           [--tile auto] [--chunks 64,256,256] [--env NAME=VALUE]
                                           [--quick]

The network is a stand-in that costs nothing but has a real anisotropic 3-D
geometry (halo 2/8/8, step 1/4/4, valid: it returns its input cropped by the
halo), so every second and every byte measured is the pipeline's: reading and
decompressing chunks, the mirror gather, cropping, argmax, compression,
writing and the pyramid. Its labels are 1 where a voxel is >= 128, which lets
the script check the output against the input on sampled blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import tilesegment as ts
from _common import RESULTS, plot_peak_rss, write_rows

HALO = (2, 8, 8)


class Threshold3d(torch.nn.Module):
    """Valid 3-D stand-in network: crops its input by the halo and scores ``voxel >= 128``."""

    geometry = ts.Geometry(halo=HALO, step=(1, 4, 4), shrink=tuple(2 * h for h in HALO))

    def __init__(self) -> None:
        super().__init__()
        self.declares_one_channel = torch.nn.Conv3d(1, 1, 1)  # never run; one input channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (hz, hy, hx) = HALO
        centre = x[:, :, hz:-hz, hy:-hy, hx:-hx] - 0.5  # uint8 / 255: 127 -> -0.002, 128 -> +0.002
        return torch.cat([-centre, centre], dim=1)


def write_volume(path: Path, shape: tuple[int, int, int], chunks: tuple[int, int, int]) -> float:
    """Write a smooth-plus-noise uint8 OME-Zarr volume chunk by chunk; return the seconds it took."""
    import zarr

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    # Smooth 1-D profiles per axis: their sum gives blob-free but varied structure,
    # and labels that are neither all 0 nor all 1 in any large region.
    profiles = [np.cumsum(rng.normal(size=n)).astype(np.float32) for n in shape]
    profiles = [20 * (p - p.mean()) / (p.std() + 1e-6) for p in profiles]
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    array = root.create_array("0", shape=shape, chunks=chunks, dtype="uint8")
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 0.25, 0.25]}]}],
    }]}
    for z in range(0, shape[0], chunks[0]):
        for y in range(0, shape[1], chunks[1]):
            for x in range(0, shape[2], chunks[2]):
                sz, sy, sx = (slice(o, min(o + c, n)) for o, c, n in zip((z, y, x), chunks, shape))
                block = (128 + profiles[0][sz, None, None] + profiles[1][None, sy, None]
                         + profiles[2][None, None, sx])
                block += rng.integers(-24, 25, size=block.shape, dtype=np.int8)
                array[sz, sy, sx] = np.clip(block, 0, 255).astype(np.uint8)
    return time.perf_counter() - start


def check_sample(volume: Path, output: Path, blocks: int = 8, size: int = 64) -> int:
    """Compare the labels with ``input >= 128`` on random blocks; return the differing voxels."""
    import zarr

    source = zarr.open_array(str(volume / "0"), mode="r")
    labels = zarr.open_array(str(output / "0"), mode="r")
    assert labels.shape == source.shape, (labels.shape, source.shape)
    rng = np.random.default_rng(1)
    wrong = 0
    for _ in range(blocks):
        lo = [int(rng.integers(0, max(1, n - size))) for n in source.shape]
        window = tuple(slice(o, o + size) for o in lo)
        wrong += int(np.count_nonzero(labels[window] != (source[window] >= 128)))
    return wrong


CHILD = """
import resource, sys, time
sys.path.insert(0, {here!r})
import torch
import tilesegment as ts
from memory_scaling_3d import Threshold3d
from tilesegment.process import return_large_buffers
torch.set_num_threads({threads})
return_large_buffers()  # as the CLI does for volume runs; a library call leaves the process alone
start = time.perf_counter()
ts.segment({volume!r}, Threshold3d(), {output!r}, tile_size={tile!r}, device="cpu", progress=False)
seconds = time.perf_counter() - start
print("RESULT", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seconds)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128x512x512,512x2048x2048", help="Z x Y x X, comma-separated")
    parser.add_argument("--tile", default="auto", help='Z,Y,X or "auto" (the default rule)')
    parser.add_argument("--chunks", default="64,256,256", help="input chunk shape Z,Y,X")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tmp", default=None, help="folder for the volumes (default: the system's)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the segmenting processes only (repeatable), "
                        "e.g. MALLOC_MMAP_THRESHOLD_=1048576 to see what glibc's heap keeps")
    parser.add_argument("--name", default="memory_scaling_3d", help="results/<name>.{csv,json,png}")
    parser.add_argument("--quick", action="store_true", help="32x128x128 and 128x512x512")
    args = parser.parse_args()
    if args.quick:
        args.sizes = "32x128x128,128x512x512"
    tile = args.tile if args.tile == "auto" else tuple(int(v) for v in args.tile.split(","))
    chunks = tuple(int(v) for v in args.chunks.split(","))
    child_env = dict(os.environ, **dict(e.split("=", 1) for e in args.env))
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="tilesegment-vol-") as tmp:
        for size in args.sizes.split(","):
            shape = tuple(int(v) for v in size.split("x"))
            volume, output = Path(tmp) / f"vol{size}.zarr", Path(tmp) / f"labels{size}.zarr"
            write_seconds = write_volume(volume, shape, chunks)
            disk = sum(f.stat().st_size for f in volume.rglob("*") if f.is_file())
            print(f"{size}: wrote {disk / 1e9:.2f} GB in {write_seconds:.0f} s", flush=True)
            code = CHILD.format(here=str(Path(__file__).resolve().parent), threads=args.threads,
                                volume=str(volume), output=str(output), tile=tile)
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  env=child_env)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT")), None)
            if done.returncode or line is None:
                sys.exit(f"segment failed on {size}:\n{done.stderr[-3000:]}")
            peak, seconds = (float(v) for v in line.split()[1:])
            voxels = int(np.prod(shape))
            rows.append({"shape": size, "gvox": round(voxels / 1e9, 4), "peak_rss_mb": round(peak, 1),
                         "seconds": round(seconds, 2), "mvox_per_s": round(voxels / 1e6 / seconds, 2),
                         "input_gb_on_disk": round(disk / 1e9, 3),
                         "tile": tile if tile == "auto" else "x".join(map(str, tile)),
                         "input_chunks": "x".join(map(str, chunks)),
                         "wrong_voxels_in_sample": check_sample(volume, output),
                         "child_env": " ".join(args.env), "load_avg_1min": round(os.getloadavg()[0], 2)})
            print(rows[-1], flush=True)
            shutil.rmtree(volume)
            shutil.rmtree(output)
    _, json_path = write_rows(args.name, rows)
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    data = json.loads(json_path.read_text())
    data.update(peak_rss_ratio=round(ratio, 3), torch=torch.__version__)
    json_path.write_text(json.dumps(data, indent=2))
    plot_peak_rss([r["gvox"] * 1e3 for r in rows], [r["peak_rss_mb"] for r in rows], "volume",
                  RESULTS / f"{args.name}.png", labels=[r["shape"] for r in rows])
    print(f"peak RSS ratio {rows[-1]['shape']} / {rows[0]['shape']}: {ratio:.3f}")


if __name__ == "__main__":
    main()
