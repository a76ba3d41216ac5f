"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_rgb_tiff(path: Path, size: int, tile: int = 512) -> Path:
    """Write a tiled, JPEG-compressed RGB TIFF of `size` x `size` without holding it in memory."""
    import tifffile

    def tiles():
        yy, xx = np.mgrid[0:tile, 0:tile].astype(np.float32)
        rng = np.random.default_rng(0)
        for ty in range(0, size, tile):
            for tx in range(0, size, tile):
                wave = np.sin((yy + ty) / 37.0) * np.cos((xx + tx) / 23.0)
                noise = rng.normal(0, 12, (tile, tile, 1))
                base = np.array([220, 140, 200]) - 60 * wave[..., None]
                yield np.clip(base + noise, 0, 255).astype(np.uint8)

    tifffile.imwrite(
        path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile),
        photometric="rgb", compression="jpeg", bigtiff=True,
    )
    return path


def write_rows(name: str, rows: list[dict]) -> tuple[Path, Path]:
    """Write `rows` as results/<name>.csv and results/<name>.json (with machine info)."""
    RESULTS.mkdir(exist_ok=True)
    csv_path, json_path = RESULTS / f"{name}.csv", RESULTS / f"{name}.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    machine = {"python": platform.python_version(), "machine": platform.machine(),
               "processor": platform.processor(), "cpus": __import__("os").cpu_count()}
    json_path.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return csv_path, json_path
