"""Benchmarks: cost figures of a network and tile size x batch size sweeps."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._probe import trace
from .geometry import Geometry, Shape

__all__ = [
    "PEAK_TFLOPS",
    "auto_tile_sizes",
    "bare_model_seconds",
    "bench",
    "count_flops",
    "flops_per_pixel",
    "recommend",
    "write_results",
]

#: Dense bf16/fp16 tensor-core peaks (TFLOP/s) by device-name fragment, for efficiency figures.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
               "A10": 125.0, "L4": 121.0, "V100": 125.0, "RTX 4090": 165.0}


def count_flops(model: nn.Module, in_channels: int, input_size: Shape) -> int:
    """Floating-point operations (multiply + add = 2) of one forward pass on one input.

    Counts convolutions, transposed convolutions and linear layers, which are
    all but a negligible part of a U-Net's work; measured on the meta device
    (`tilesegment._probe.trace`). TorchScript parts cannot be looked into
    and count 0.
    """
    total = 0

    def count(layer: nn.Module, inputs: tuple, output) -> None:
        nonlocal total
        if isinstance(layer, (nn.Conv2d, nn.Conv3d)):
            k = math.prod(layer.kernel_size)
            total += 2 * output.numel() * (layer.in_channels // layer.groups) * k
        elif isinstance(layer, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
            k = math.prod(layer.kernel_size)
            total += 2 * inputs[0].numel() * layer.out_channels * k
        elif isinstance(layer, nn.Linear):
            total += 2 * output.numel() * layer.in_features

    trace(model, (1, in_channels, *input_size), count)
    return total


def flops_per_pixel(model: nn.Module, in_channels: int, geometry: Geometry, tile_size: Shape) -> float:
    """FLOPs per *written* output pixel at `tile_size` (halo overhead included)."""
    n_in = geometry.input_size(tile_size)
    return count_flops(model, in_channels, n_in) / math.prod(tile_size)


# -- tile size x batch size sweeps ------------------------------------------------------


def bare_model_seconds(executor, batches: int, shape: tuple[int, ...]) -> float:
    """Seconds for `batches` forward passes of device-resident inputs of `shape` (no I/O, no copies).

    Inputs rotate through up to 8 distinct tensors: like real tiles, and unlike
    one tensor reused, they are not already in the CPU cache.
    """
    import time

    from .executor import memory_format

    fmt = memory_format(len(shape)) if executor.channels_last else torch.contiguous_format
    inputs = [torch.rand(shape, device=executor.device).contiguous(memory_format=fmt)
              for _ in range(min(batches, 8))]
    with torch.inference_mode(), executor.precision_context():
        executor.model(inputs[0])
        _sync(executor.device)
        start = time.perf_counter()
        for i in range(batches):
            executor.model(inputs[i % len(inputs)])
        _sync(executor.device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakRSS:
    """Highest resident set size (MB) seen while the block runs, sampled every 10 ms."""

    def __enter__(self) -> "_PeakRSS":
        import threading

        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, name="tilesegment-rss", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the lifetime peak is the best we have
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def auto_tile_sizes(geometry: Geometry, shape: Shape) -> list[int]:
    """Tile sizes worth trying for an image: 128 to 2048 (multiples of the step), not past the
    image; for a volume, y/x edges of 32 to 256 (see `bench`)."""
    step = geometry.step[-1]
    top = max(shape[-2:])
    edges = (128, 256, 512, 1024, 2048) if geometry.ndim == 2 else (32, 64, 128, 256)
    sizes = sorted({max(step, t // step * step) for t in edges})
    return [t for t in sizes if t <= max(top, sizes[0])] or sizes[:1]


def bench(
    image=None,
    model="demo",
    tile_sizes="auto",
    batch_sizes=(1, 2),
    device: str = "auto",
    precision: str = "auto",
    size: int = 2048,
    out=None,
    repeats: int = 1,
) -> list[dict]:
    """Measure throughput and memory for every tile size x batch size.

    Each cell segments the image end to end (readers, executor, stitcher,
    writers, to an OME-Zarr in a temporary folder) and times the bare network
    on the same number of batches of the same shape. Rows hold: end-to-end and
    model-only Mpx/s (written pixels), halo overhead (computed / written
    pixels), GFLOP per written pixel, latency per batch, peak host RSS and
    peak device memory.

    Parameters
    ----------
    image : path or array, optional
        What to segment; default a random uint8 RGB image of `size` x `size`
        (throughput does not depend on the content), or for a 3-d network a
        one-channel volume of ``size / 32 x size / 8 x size / 8`` (64 x 256 x
        256 at the default size).
    model : module or spec
        Anything `load_model` accepts (default: the demo model).
    tile_sizes : sequence of int or "auto"
        "auto": 128 to 2048 as the image allows (`auto_tile_sizes`). For a
        volume each is the y/x edge, and z follows in proportion to the
        network's step (`tilesegment.api.volume_tile`); rows then also say
        the whole tile (``tile``, e.g. ``"16x64x64"``).
    batch_sizes : sequence of int
    device, precision
        As for `segment`, but one device: the first of ``"cuda"`` or
        ``"auto"``'s GPUs, since each cell is compared with that device's bare
        model and peak memory.
    out : path, optional
        Folder for bench.csv, bench.json and bench.png.
    repeats : int
        Best of this many runs per cell.

    Returns
    -------
    list of dict
        One row per cell; ``recommend(rows)`` picks the fastest.
    """
    import tempfile
    from pathlib import Path

    import numpy as np

    from .api import prepare, segment, volume_tile
    from .executor import resolve_devices
    from .models.base import describe
    from .models.load import load_model

    device = str(resolve_devices(device)[0])
    net = describe(load_model(model))
    geometry = net.geometry
    volume = geometry.ndim == 3
    if image is None:
        shape = (max(8, size // 32), size // 8, size // 8, 1) if volume else (size, size, 3)
        image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        axes = "ZYXC" if volume else None
    else:
        axes = None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        first = prepare(image, net, device=device, precision=precision, axes=axes,
                        tile_size=tuple(st * 8 for st in geometry.step))
        if tile_sizes in ("auto", None):
            tile_sizes = auto_tile_sizes(geometry, first.plan.shape)
        in_channels = net.in_channels or first.tiler.source.channels
        # Warm up (numba compilation, oneDNN/cuDNN set-up) outside the measurements.
        warm = np.zeros((*(st * 4 for st in geometry.step), in_channels), np.float32)
        segment(warm, net, tile_size=tuple(st * 2 for st in geometry.step), device=first.devices[0],
                axes="ZYXC" if volume else "YXC", precision=precision, progress=False)
        for edge in tile_sizes:
            tile = volume_tile(edge, geometry, first.plan.shape) if volume else edge
            for batch in batch_sizes:
                best = None
                for r in range(repeats):
                    job = prepare(image, net, Path(tmp) / f"t{edge}b{batch}r{r}.zarr", tile_size=tile, axes=axes,
                                  batch_size=batch, device=device, precision=precision)
                    dev = job.devices[0]
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    with _PeakRSS() as rss, job:
                        _, stats = job.run(progress=False)
                    executor = job.executors()[0]
                    n_batches = -(-job.plan.n_tiles // job.batch_size)
                    shape = (job.batch_size, in_channels, *job.plan.input_size)
                    model_s = bare_model_seconds(executor, n_batches, shape)
                    if best is None or stats.seconds < best[0].seconds:
                        best = (stats, model_s, rss.peak, job, dev)
                stats, model_s, peak, job, dev = best
                mpx = stats.pixels / 1e6
                rows.append({
                    "tile_size": edge, **({"tile": "x".join(map(str, tile))} if volume else {}),
                    "input_size": job.plan.input_size[-1], "batch_size": job.batch_size,
                    "tiles": job.plan.n_tiles, "device": str(dev), "precision": executor.precision,
                    "end_to_end_mpx_s": round(mpx / stats.seconds, 4),
                    "model_only_mpx_s": round(mpx / model_s, 4),
                    "halo_overhead": round(job.plan.computed_fraction(), 3),
                    "gflop_per_px": round(flops_per_pixel(net, in_channels, geometry, job.plan.tile_size) / 1e9, 6),
                    "batch_latency_ms": round(1000 * stats.seconds / n_batches, 1),
                    "peak_host_mb": round(peak, 1),
                    "peak_device_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None,
                })
        first.tiler.close()
    if out is not None:
        write_results(rows, Path(out))
    return rows


def recommend(rows: list[dict]) -> dict:
    """The fastest cell end to end."""
    return max(rows, key=lambda r: r["end_to_end_mpx_s"])


def write_results(rows: list[dict], out) -> list:
    """Write bench.csv, bench.json and (with matplotlib) bench.png into `out`; return the paths."""
    import csv
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "bench.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "bench.json").write_text(json.dumps({"rows": rows, "recommended": recommend(rows)}, indent=2))
    paths = [out / "bench.csv", out / "bench.json"]
    try:
        import matplotlib
    except ImportError:
        return paths
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({r["batch_size"] for r in rows}):
        cells = sorted((r for r in rows if r["batch_size"] == batch), key=lambda r: r["tile_size"])
        ax.plot([r["tile_size"] for r in cells], [r["end_to_end_mpx_s"] for r in cells], "o-", label=f"batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tile size (written px)")
    ax.set_ylabel("end-to-end throughput (Mpx/s)")
    ax.legend(loc="upper left")
    halo = ax.twinx()
    cells = sorted({(r["tile_size"], r["halo_overhead"]) for r in rows})
    halo.plot([c[0] for c in cells], [c[1] for c in cells], "k--", alpha=0.5)
    halo.set_ylabel("halo overhead (computed / written px), dashed")
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)
    plt.close(fig)
    return paths + [out / "bench.png"]
