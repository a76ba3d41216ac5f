"""How much `tissue_mask="auto"` saves on a real slide, and that it changes no computed pixel.

    python benchmarks/tissue_skip.py [SLIDE] [--tile-size 256] [--base 8]

Segments SLIDE (default ../shared/data/small_HE.svs) with and without the
automatic tissue mask (alternating, best of --repeats, tissue detection
included in the masked time), and writes
results/tissue_skip.{csv,json}: tiles computed, fraction skipped, both times
and their ratio, and the largest difference on computed pixels (must be 0).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import tilesegment as ts
from _common import write_rows

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "small_HE.svs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--base", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="best of N, alternating")
    args = parser.parse_args()
    torch.manual_seed(0)
    net = ts.UNet(3, 3, base_channels=args.base, depth=4).eval()
    ts.segment(np.zeros((32, 32, 3), np.uint8), net, tile_size=16, progress=False)  # warm up

    full_s = masked_s = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        full = ts.segment(args.slide, net, tile_size=args.tile_size, device="cpu", progress=False)
        full_s = min(full_s, time.perf_counter() - start)
        start = time.perf_counter()
        job = ts.prepare(args.slide, net, tile_size=args.tile_size, device="cpu", tissue_mask="auto")
        masked, stats = job.run(progress=False)
        masked_s = min(masked_s, time.perf_counter() - start)  # includes detecting the tissue

    diff = 0
    for i in np.flatnonzero(job.tissue):
        t = job.plan.tile(int(i))
        window = (slice(t.origin[0], t.origin[0] + t.size[0]), slice(t.origin[1], t.origin[1] + t.size[1]))
        diff = max(diff, int(np.abs(masked[window].astype(int) - full[window]).max()))
    row = {
        "slide": args.slide.name, "tile_size": args.tile_size, "base_channels": args.base,
        "tiles": job.plan.n_tiles, "computed": int(job.tissue.sum()), "skipped": stats.skipped,
        "skipped_fraction": round(stats.skipped / job.plan.n_tiles, 4),
        "full_s": round(full_s, 2), "masked_s": round(masked_s, 2),
        "time_ratio_masked_over_full": round(masked_s / full_s, 3),
        "max_label_difference_on_computed_pixels": diff,
    }
    write_rows("tissue_skip", [row])
    print(row)


if __name__ == "__main__":
    main()
