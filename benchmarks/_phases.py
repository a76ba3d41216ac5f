"""Where the fixed time of a `segment()` run goes: wall-clock intervals of its phases.

`PhaseClock` wraps the methods that do per-run (not per-tile) work and records
when each ran; `breakdown` turns one run's records into seconds per phase. The
wrappers only read the clock, so a run under the clock does the same work.
`first_run_seconds` measures in fresh processes what the first run of a
process pays (imports, numba's cached kernels, lazy imports) and the second
does not.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

#: (module, class or None for a module-level function, name, phase): the per-run work, timed
#: while it runs.
WRAPPED = [
    ("tilesegment.runner", None, "make_executors", "executors (model copies)"),
    ("tilesegment.stitch", "Stitcher", "__init__", "output creation"),
    ("tilesegment.io.sinks", "ZarrSink", "_build_pyramid", "pyramid"),
    ("tilesegment.io.sinks", None, "write_ome", "metadata"),
    ("tilesegment.io.manifest", "Manifest", "finish", "manifest"),
    ("tilesegment.executor", "Executor", "__call__", "network"),
    ("tilesegment.stitch", "Stitcher", "close", "finish (close)"),
]


class PhaseClock:
    """Record ``(phase, start, end)`` of every wrapped call, from any thread."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()

    @contextmanager
    def running(self) -> Iterator["PhaseClock"]:
        import importlib

        saved = []
        for module, cls, name, phase in WRAPPED:
            owner = importlib.import_module(module)
            owner = owner if cls is None else getattr(owner, cls)
            original = getattr(owner, name)
            saved.append((owner, name, original))
            setattr(owner, name, self._timed(original, phase))
        try:
            yield self
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)

    def _timed(self, function, phase: str):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                with self._lock:
                    self.events.append((phase, start, time.perf_counter()))

        return timed


def breakdown(events: list[tuple[str, float, float]], start: float, end: float) -> dict[str, float]:
    """Seconds per phase of one run from `start` to `end`.

    Besides the wrapped phases: ``fill``, from the start of the run to the
    first network call (reading and gathering the first batch), and
    ``drain``, from the end of the last network call to the start of
    ``finish (close)`` (stitching and writing the last blocks).
    """
    total: dict[str, float] = {}
    for phase, a, b in events:
        total[phase] = total.get(phase, 0.0) + (b - a)
    network = [(a, b) for phase, a, b in events if phase == "network"]
    close = [a for phase, a, _ in events if phase == "finish (close)"]
    if network:
        total["fill"] = min(a for a, _ in network) - start
        total["drain"] = (min(close) if close else end) - max(b for _, b in network)
    total["run"] = end - start
    return {k: round(v, 4) for k, v in total.items()}


_FIRST_RUN = """
import time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import tilesegment as ts
t2 = time.perf_counter()
import numpy as np, tempfile, pathlib
net = ts.UNet(3, 3, base_channels=4, depth=2).eval()
image = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
with tempfile.TemporaryDirectory() as tmp:
    times = []
    for i in range(2):
        s = time.perf_counter()
        ts.segment(image, net, pathlib.Path(tmp) / f"o{i}.zarr", tile_size=64, device="cpu", progress=False)
        times.append(time.perf_counter() - s)
print(t1 - t0, t2 - t1, times[0], times[1])
"""


def first_run_seconds(repeats: int = 3) -> dict[str, float]:
    """Median over fresh processes: ``import torch``, ``import tilesegment``, and the first
    and second `segment()` of a small image into zarr (their difference is what only
    the first run of a process pays)."""
    import numpy as np

    rows = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _FIRST_RUN], capture_output=True, text=True, check=True)
        rows.append([float(v) for v in out.stdout.split()])
    torch_s, ts_s, first, second = np.median(np.array(rows), axis=0)
    return {"import_torch_s": round(float(torch_s), 3), "import_tilesegment_s": round(float(ts_s), 3),
            "first_segment_s": round(float(first), 3), "second_segment_s": round(float(second), 3),
            "first_run_extra_s": round(float(first - second), 3)}
