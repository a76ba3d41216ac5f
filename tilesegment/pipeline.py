"""Run the stages concurrently: readers -> executors (a thread per device) -> stitcher.

Reading and gathering run ahead in the tiler's thread pool; each executor
thread pulls the next batch, starts it on its device and hands the result
on while it is still in flight (`InFlight`); the calling thread waits only
for results and stitches them.
Queues are bounded, so memory stays O(batch). An error in any stage stops
every stage and is re-raised in the caller, with no thread left behind.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import Cancelled
from .executor import Executor
from .stitch import Stitcher
from .tiler import Batch

__all__ = ["run_pipeline"]

_DONE = object()


def run_pipeline(
    batches: Iterator[Batch],
    executors: Sequence[Executor],
    stitcher: Stitcher,
    on_progress: Callable[[int], None] = lambda n: None,
    depth: int = 2,
    skipped: Sequence[int] = (),
    cancelled: Callable[[], bool] = lambda: False,
) -> None:
    """Feed `batches` through `executors` into `stitcher` until all are done.

    Parameters
    ----------
    batches : iterator of Batch
        Usually ``tiler.batches(...)``; shared by all executors.
    executors : sequence of Executor
        One thread each; batches go to whichever is free.
    stitcher : Stitcher
        Receives every result in the calling thread, in completion order.
    on_progress : callable
        Called with the number of tiles after each stitched batch.
    depth : int
        Results in flight per executor (bounds memory).
    skipped : sequence of int
        Sorted plan indices that are not computed; `stitcher.fill` writes
        them as background, interleaved in plan order so that blocks
        complete (and leave memory) as they would without skipping.
    cancelled : callable
        Asked before each batch is taken; once it returns True no batch is
        started, the batches in flight are stitched, and `Cancelled` is raised.

    Raises
    ------
    Cancelled
        When `cancelled` said so (the stitcher has every finished tile).
    """
    stop, abandon, stopped_by_caller = threading.Event(), threading.Event(), threading.Event()
    results: queue.Queue = queue.Queue(maxsize=max(1, depth) * len(executors))
    take_lock = threading.Lock()
    errors: list[BaseException] = []

    def take():
        with take_lock:
            if not stop.is_set() and cancelled():
                stopped_by_caller.set()
                stop.set()
            return None if stop.is_set() else next(batches, None)

    def put(item) -> None:
        while not abandon.is_set():
            try:
                return results.put(item, timeout=0.1)
            except queue.Full:
                pass

    def work(executor: Executor) -> None:
        try:
            while (batch := take()) is not None:
                # Only the indices travel on: the (pinned) input can be freed now.
                put((batch.indices, batch.failed, executor(batch.data)))
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)
            stop.set()
        finally:
            put(_DONE)

    threads = [
        threading.Thread(target=work, args=(ex,), name=f"tilesegment-exec-{i}", daemon=True)
        for i, ex in enumerate(executors)
    ]
    for thread in threads:
        thread.start()
    finished, skip_at = 0, 0
    try:
        while finished < len(threads):
            item = results.get()
            if item is _DONE:
                finished += 1
            elif not stop.is_set() or stopped_by_caller.is_set():  # a cancelled run keeps its results
                indices, failed, output = item
                array = output.numpy()
                ok = ~np.isin(indices, failed)
                if output.nonfinite is not None and output.nonfinite[ok].any():
                    stitcher.raise_nonfinite(int(indices[ok][output.nonfinite[ok]][0]))
                if ok.any():
                    stitcher.add(indices[ok], array[ok], reduced=output.reduced)
                if len(failed):
                    stitcher.fill(failed, failed=True)
                on_progress(len(indices))
                until = int(np.searchsorted(skipped, indices.max()))
                if until > skip_at:
                    stitcher.fill(skipped[skip_at:until])
                    skip_at = until
        if not errors and skip_at < len(skipped) and not stopped_by_caller.is_set():
            stitcher.fill(skipped[skip_at:])
    except BaseException:
        stop.set()
        while finished < len(threads):  # drain, so no executor blocks on a full queue
            if results.get() is _DONE:
                finished += 1
        raise
    finally:
        abandon.set()  # a second Ctrl-C may have cut the drain short: let workers go
        for thread in threads:
            thread.join()
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    if errors:
        raise errors[0]
    if stopped_by_caller.is_set():
        raise Cancelled("run cancelled")
