"""Time of a resumed run relative to a full one, after a SIGKILL at about 60 %.

    python benchmarks/resume.py [--size 3072] [--kill-at 0.6]

Writes a tiled RGB TIFF, segments it once in full (CLI, demo model, tile
512, labels to OME-Zarr), then again in a process killed with SIGKILL once
`--kill-at` of the blocks are recorded, and resumes it with `--resume`.
Checks the resumed output equals the full one and writes
results/resume.{csv,json}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from _common import synthetic_rgb_tiff, write_rows
from tilesegment.io.manifest import Manifest


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tilesegment.cli", "segment", *args, "--tile-size", "512", "--chunk-size", "512",
            "--quiet", "--device", "cpu"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=3072)
    parser.add_argument("--kill-at", type=float, default=0.6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        slide = synthetic_rgb_tiff(tmp / "slide.tif", args.size)
        start = time.perf_counter()
        subprocess.run(cli(str(slide), str(tmp / "full.zarr")), check=True)
        full_s = time.perf_counter() - start

        out = tmp / "killed.zarr"
        blocks = (-(-args.size // 512)) ** 2
        proc = subprocess.Popen(cli(str(slide), str(out)))
        manifest = Manifest(out)
        while len(manifest.done_blocks()) < args.kill_at * blocks and proc.poll() is None:
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        done = len(manifest.done_blocks())
        start = time.perf_counter()
        subprocess.run(cli(str(slide), str(out), "--resume"), check=True)
        resume_s = time.perf_counter() - start
        same = bool(np.array_equal(zarr.open_array(out / "0")[:], zarr.open_array(tmp / "full.zarr" / "0")[:]))
    row = {"image": args.size, "blocks": blocks, "done_when_killed": done,
           "full_s": round(full_s, 2), "resumed_s": round(resume_s, 2),
           "resumed_over_full": round(resume_s / full_s, 3),
           "remaining_fraction": round(1 - done / blocks, 3), "identical": same}
    write_rows("resume", [row])
    print(row)


if __name__ == "__main__":
    main()
