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


def write_rows(name: str, rows: list[dict], folder: Path = RESULTS) -> tuple[Path, Path]:
    """Write `rows` as <folder>/<name>.csv and <folder>/<name>.json (with machine info)."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = folder / f"{name}.csv", folder / f"{name}.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    machine = {"python": platform.python_version(), "machine": platform.machine(),
               "processor": platform.processor(), "cpus": __import__("os").cpu_count()}
    json_path.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return csv_path, json_path


def plot_speed_and_error(names: list[str], speeds: list[float], errors: list[float], speed_label: str,
                         error_label: str, path: Path, height: float = 3.6) -> None:
    """Two bar charts side by side: throughput (higher is better) and error (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10.5, height))
    a.barh(names, speeds, color="tab:blue")
    a.set_xlabel(f"{speed_label}, higher is better")
    a.invert_yaxis()
    b.barh(names, [max(e, 1e-9) for e in errors], color="tab:red")
    b.set_xscale("log")
    b.set_xlabel(f"{error_label} (lower is better)")
    b.set_yticklabels([])
    b.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_peak_rss(sizes: list[float], peaks: list[float], what: str, path: Path,
                  labels: list[str] | None = None) -> None:
    """Peak RSS against input size (log x), optionally labelled point by point."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sizes, peaks, "o-")
    for x, y, label in zip(sizes, peaks, labels or []):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(0, max(peaks) * 1.3)
    ax.set_xlabel(f"{what} size ({'Mvox' if what == 'volume' else 'Mpx'})")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title(f"tilesegment peak memory vs {what} size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
