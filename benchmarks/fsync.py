"""What durable completion records cost: an output written with and without fsync.

A `ZarrSink` with a run record (so every block gets its done marker, as in
a real run) is fed synthetic label blocks of one chunk each (512 x 512,
uint8, a smooth class map that compresses as real ones do) and closed
(pyramid, metadata, manifest removal). Runs with syncing on and off
alternate (`tilesegment.io.durable.ENABLED`, the knob ``TILESEGMENT_FSYNC=0``
sets), each into a fresh folder; the median of `--repeats` is reported.

    python benchmarks/fsync.py [--sizes 2048 8192] [--repeats 5] [--folder /data/tmp]

``--segment`` measures whole runs instead, where the syncs overlap the
network: ``ts.segment`` of a synthetic RGB slide into OME-Zarr, with the
demo model at 2048² and a tiny U-Net (base 4, depth 2: the write path's
worst case, little compute to hide it behind) at 8192².

Writes benchmarks/results/fsync.{csv,json}. The figure depends on the disk
under `--folder` (default: the system's temporary folder).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from _common import write_rows

CHUNK = 512


def blocks(size: int):
    """(region, labels) for each chunk of a size x size class map, in raster order."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:CHUNK, 0:CHUNK].astype(np.float32)
    for y in range(0, size, CHUNK):
        for x in range(0, size, CHUNK):
            wave = np.sin((yy + y) / 41.0) * np.cos((xx + x) / 29.0) + rng.normal(0, 0.05, (CHUNK, CHUNK))
            yield (slice(y, y + CHUNK), slice(x, x + CHUNK)), np.digitize(wave, [-0.3, 0.4]).astype(np.uint8)


def write_once(folder: Path, size: int, data: list) -> float:
    """Seconds to write one output of `size` x `size` from `data` into a fresh folder."""
    from tilesegment.io.sinks import ZarrSink

    out = folder / "out.zarr"
    start = time.perf_counter()
    sink = ZarrSink(out, (size, size), np.uint8, (CHUNK, CHUNK), labels=3, writers=2,
                    record={"benchmark": "fsync"})
    for block, (region, labels) in enumerate(data):
        sink.commit(region, labels, block)
    sink.close()
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds


def segment_once(folder: Path, image: Path, model) -> float:
    """Seconds of one ``ts.segment`` run of `image` into a fresh output."""
    import tilesegment as ts

    out = folder / "seg.zarr"
    start = time.perf_counter()
    ts.segment(image, model, out, tile_size=512, progress=False)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds


def segment_rows(sizes: list[int], repeats: int, folder: Optional[Path]) -> list[dict]:
    import torch

    import tilesegment as ts
    from _common import synthetic_rgb_tiff
    from tilesegment.io import durable

    torch.manual_seed(0)
    rows = []
    for size in sizes:
        model = ts.load_model("demo") if size <= 2048 else ts.UNet(3, 3, base_channels=4, depth=2)
        name = "demo model" if size <= 2048 else "UNet base 4 depth 2"
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            image = synthetic_rgb_tiff(Path(tmp) / "slide.tif", size)
            segment_once(Path(tmp), image, model)  # warm up
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(repeats):
                for enabled in (True, False):
                    durable.ENABLED = enabled
                    times[enabled].append(segment_once(Path(tmp), image, model))
            durable.ENABLED = True
        on, off = statistics.median(times[True]), statistics.median(times[False])
        rows.append({"size": size, "run": f"ts.segment, {name}", "repeats": repeats,
                     "seconds_fsync": round(on, 3), "seconds_no_fsync": round(off, 3),
                     "overhead_pct": round(100 * (on - off) / off, 1)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    from tilesegment.io import durable

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=None, help="where the outputs are written")
    parser.add_argument("--segment", action="store_true", help="whole ts.segment runs (fsync_segment.csv)")
    args = parser.parse_args()
    if args.segment:
        write_rows("fsync_segment", segment_rows(args.sizes, args.repeats, args.folder))
        return
    rows = []
    for size in args.sizes:
        data = list(blocks(size))
        times: dict[bool, list[float]] = {True: [], False: []}
        with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
            write_once(Path(tmp), size, data)  # warm up: imports, codecs, the page cache
            for _ in range(args.repeats):
                for enabled in (True, False):  # interleaved: drift in the machine hits both alike
                    durable.ENABLED = enabled
                    times[enabled].append(write_once(Path(tmp), size, data))
            durable.ENABLED = True
            folder = str(Path(tmp).parent)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        n_blocks = len(data)
        rows.append({
            "size": size, "blocks": n_blocks, "repeats": args.repeats, "folder": folder,
            "seconds_fsync": round(on, 4), "seconds_no_fsync": round(off, 4),
            "overhead_pct": round(100 * (on - off) / off, 1),
            "ms_per_block": round(1000 * (on - off) / n_blocks, 3),
            "mpx_per_s_fsync": round(size * size / on / 1e6, 1), "mpx_per_s_no_fsync": round(size * size / off / 1e6, 1),
        })
        print(f"{size} x {size}: {n_blocks} blocks, fsync {on:.3f} s, no fsync {off:.3f} s "
              f"({rows[-1]['overhead_pct']:+.1f} %, {rows[-1]['ms_per_block']:.2f} ms per block)")
    csv_path, _ = write_rows("fsync", rows)
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
