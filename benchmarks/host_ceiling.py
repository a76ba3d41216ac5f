"""Host ceiling: how fast the host side can feed a network that costs nothing.

    python benchmarks/host_ceiling.py [--size 8192] [--tile-size 1024] [--workers 1 2] [--name host_ceiling]

Runs the real pipeline with a stand-in network that returns the centre crop of
its input (the geometry of a depth-4 U-Net: halo 92, step 16), so every
second spent is host work: reading, decoding, mirroring, gathering, the
executor's copies, cropping and argmax, compression and writing. Stages, each
timed alone and then together, on (a) a JPEG-tiled TIFF of ``size``² (256-px
tiles, like a slide) and (b) the same pixels as an in-memory uint8 array:

- ``decode``: tifffile decoding the whole TIFF at once with 2 threads, the
  physical reference;
- ``read_gather_wN``: `Tiler.batches` with N reader threads (decode + mirror
  + gather into float32 network inputs), for each N of ``--workers``;
- ``network_standin``: the executor on ready channels-last inputs (the crop);
- ``stitch``: `Stitcher.add` of raw outputs into memory (crop + argmax);
- ``stitch_write``: the same into a labels OME-Zarr (+ compression, writing,
  pyramid); ``compress_write`` is the difference;
- ``segment_tiff`` / ``segment_memory``: `segment()` end to end.

Each row gives wall Mpx/s (written pixels), the ratio to ``decode``, and
core-ms per Mpx (process CPU time over all threads). Output:
results/<name>.{csv,json,png}.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

import tilesegment as ts
from tilesegment.executor import Executor
from _common import RESULTS, synthetic_rgb_tiff, write_rows

HALO = 92


class CentreCrop(torch.nn.Module):
    """A stand-in network with a valid U-Net's geometry and no cost: its output is
    the centre of its input, so labels are the argmax over the RGB channels."""

    geometry = ts.UNet(3, 3, base_channels=1, depth=4).geometry  # halo 92, step 16, valid

    def __init__(self) -> None:
        super().__init__()
        self.declares_rgb = torch.nn.Conv2d(3, 3, 1)  # never run; tells the probes "3 channels in"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, HALO:-HALO, HALO:-HALO]


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds over all threads) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="reader threads to time")
    parser.add_argument("--name", default="host_ceiling")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for <name>.{csv,json,png}")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG (no matplotlib needed)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from results/<name>.json")
    args = parser.parse_args()
    if args.plot_only:
        import json

        plot(json.loads((RESULTS / f"{args.name}.json").read_text())["rows"], RESULTS / f"{args.name}.png")
        return
    size, tile, batch = args.size, args.tile_size, args.batch_size
    mpx = size * size / 1e6
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_rgb_tiff(Path(tmp) / "slide.tif", size, tile=256)
        with tifffile.TiffFile(path) as tif:
            image = tif.pages[0].asarray()
        geom, net = CentreCrop.geometry, CentreCrop()
        ts.segment(image[:512, :512], net, tile_size=256, progress=False)  # compile kernels
        rows = []

        def add(stage: str, source: str, wall: float, cpu: float, **extra) -> None:
            rows.append({"stage": stage, "source": source, "seconds": round(wall, 3),
                         "mpx_per_s": round(mpx / wall, 2), "core_ms_per_mpx": round(cpu * 1e3 / mpx, 1),
                         "decoded_per_pixel": None, **extra})

        def decode():
            with tifffile.TiffFile(path) as tif:
                tif.pages[0].asarray(maxworkers=2)

        add("decode", "tiff", *timed(decode))

        for workers in args.workers:
            tiler = ts.Tiler(path, geom, tile_size=tile)
            wall, cpu = timed(lambda: sum(len(b) for b in tiler.batches(batch, workers=workers)))
            cache = getattr(tiler, "last_cache", None)
            decoded = None if cache is None else round(cache.decoded_pixels / (size * size), 3)
            add(f"read_gather_w{workers}", "tiff", wall, cpu, decoded_per_pixel=decoded)
            tiler.close()

        tiler = ts.Tiler(image, geom, tile_size=tile)
        add("read_gather_w2", "memory", *timed(lambda: sum(len(b) for b in tiler.batches(batch, workers=2))))

        executor = Executor(net, "cpu")
        data = next(tiler.batches(batch, channels_last=True)).data  # as segment() gathers them
        n_batches = -(-tiler.plan.n_tiles // batch)
        outputs = []
        wall, cpu = timed(lambda: outputs.extend(executor(data).numpy() for _ in range(n_batches)))
        add("network_standin", "memory", wall, cpu)

        def stitch(output):
            target = None if output is None else ts.Output(output, writers=1)
            with ts.Stitcher(tiler.plan, target, "labels", num_classes=3) as stitcher:
                for start, out in zip(range(0, tiler.plan.n_tiles, batch), outputs):
                    idx = np.arange(start, min(start + batch, tiler.plan.n_tiles))
                    stitcher.add(idx, out[: len(idx)])

        stitch_wall, stitch_cpu = timed(lambda: stitch(None))
        add("stitch", "memory", stitch_wall, stitch_cpu)
        wall, cpu = timed(lambda: stitch(Path(tmp) / "stitch.zarr"))
        add("stitch_write", "memory", wall, cpu)
        add("compress_write", "memory", max(wall - stitch_wall, 1e-9), max(cpu - stitch_cpu, 0.0))

        for name, source in (("tiff", path), ("memory", image)):
            out = Path(tmp) / f"seg_{name}.zarr"
            wall, cpu = timed(lambda: ts.segment(source, net, out, tile_size=tile, device="cpu",
                                                 progress=False))
            add(f"segment_{name}", name, wall, cpu)

    reference = rows[0]["mpx_per_s"]
    for row in rows:
        row["ratio_to_decode"] = round(row["mpx_per_s"] / reference, 3)
        row.update(size=size, tile_size=tile, batch_size=batch)
    write_rows(args.name, rows, args.results)
    for row in rows:
        print(f"{row['stage']:>16} {row['source']:>6}  {row['mpx_per_s']:7.1f} Mpx/s  "
              f"{row['ratio_to_decode']:5.2f}x decode  {row['core_ms_per_mpx']:6.1f} core-ms/Mpx")
    if not args.no_plot:
        plot(rows, args.results / f"{args.name}.png")


def plot(rows: list[dict], path: Path) -> None:
    """Bars per stage (log Mpx/s and core-ms/Mpx), next to results/host_ceiling_before.json if
    it exists (the same script run on the code before decode-once, for comparison)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before_file = RESULTS / "host_ceiling_before.json"
    before = {}
    if before_file.exists() and path.stem != "host_ceiling_before":
        before = {(r["stage"], r["source"]): r for r in json.loads(before_file.read_text())["rows"]}
    labels = [f"{r['stage']} ({r['source']})" for r in rows]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "mpx_per_s", "written Mpx/s (wall, 2 cores; log)"),
                           (axes[1], "core_ms_per_mpx", "core-ms per written Mpx")):
        height = 0.4 if before else 0.8
        if before:
            old = [before.get((r["stage"], r["source"]), {}).get(key, 0) or 0 for r in rows]
            ax.barh(y + height / 2, old, height, color="0.7", label="before (per-tile reads)")
        ax.barh(y - height / 2 * bool(before), [r[key] or 0 for r in rows], height, color="tab:blue",
                label="now")
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label)
    axes[0].set_xscale("log")
    axes[1].legend(fontsize=8)
    fig.suptitle("Host ceiling: stand-in network, 8192² JPEG TIFF and in-memory uint8, tile 1024")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
