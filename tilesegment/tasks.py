"""Where independent pieces of a run execute: a thread pool here, or a dask.distributed cluster.

Segmentation blocks and the objects passes both split their work into
groups (of blocks, of chunks) whose results come back in any order. A
`TaskRunner` runs ``fn(*shared, group)`` for each group and yields the
results as they finish; closing the iterator early (an error, a cancel)
cancels what has not started. The callers do not know which runner they
have, so a run on a cluster takes the same path as a local one.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterator, Optional, Sequence

__all__ = ["TaskRunner", "ThreadTasks", "ClusterTasks", "task_runner", "chunk_groups"]


class TaskRunner:
    """Runs groups of work; see `ThreadTasks` and `ClusterTasks`."""

    #: How many tasks run at once (threads, or the cluster's workers).
    workers: int = 1
    #: Whether tasks run in other processes (their arguments travel by pickle).
    remote: bool = False

    def map(self, fn: Callable, groups: Sequence[Any], shared: tuple = (), *, name: str = "tilesegment",
            resources: Optional[dict] = None) -> Iterator[tuple[Any, Any]]:
        """Yield ``(group, fn(*shared, group))`` for every group, as each finishes.

        Parameters
        ----------
        fn : callable
            A module-level function (it must pickle for a cluster).
        groups : sequence
            One task each.
        shared : tuple
            Arguments every task gets; sent to a cluster's workers once.
        name : str
            Prefix of the task keys (dask dashboards show it).
        resources : dict, optional
            dask worker resources each task needs (``{"GPU": 1}``).
        """
        raise NotImplementedError


class ThreadTasks(TaskRunner):
    """Tasks on `workers` threads of this process (numpy, numba and torch release the GIL)."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, int(workers))

    def map(self, fn, groups, shared=(), *, name="tilesegment", resources=None):
        if self.workers == 1:  # no thread: tracebacks and profiles stay plain
            for group in groups:
                yield group, fn(*shared, group)
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix=name)
        pending = iter(groups)
        running: dict = {}
        try:
            # At most two tasks per thread in flight: results are consumed as they come.
            for group in pending:
                running[pool.submit(fn, *shared, group)] = group
                if len(running) >= 2 * self.workers:
                    break
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    group = running.pop(future)
                    yield group, future.result()
                    nxt = next(pending, None)
                    if nxt is not None:
                        running[pool.submit(fn, *shared, nxt)] = nxt
        finally:
            for future in running:
                future.cancel()
            pool.shutdown(wait=True)


class ClusterTasks(TaskRunner):
    """Tasks on a dask.distributed `client`'s workers; `shared` is scattered to each once."""

    remote = True

    def __init__(self, client: Any) -> None:
        self.client = client
        self.workers = max(1, len(client.scheduler_info().get("workers", {})))

    def has_gpus(self) -> bool:
        """Whether the workers declare a ``GPU`` resource (then each task claims one)."""
        workers = self.client.scheduler_info()["workers"].values()
        return any("GPU" in w.get("resources", {}) for w in workers)

    def map(self, fn, groups, shared=(), *, name="tilesegment", resources=None):
        import uuid

        from distributed import as_completed

        client = self.client
        scattered = [client.scatter(s, broadcast=True, hash=False) for s in shared]
        run = uuid.uuid4().hex[:12]
        # No retries: the scheduler already reschedules the tasks of a worker that dies
        # (allowed-failures); a task that raises (NaN, corrupt tile) would only fail again.
        futures = {
            client.submit(fn, *scattered, group, pure=False, key=f"{name}-{run}-{i}", resources=resources): i
            for i, group in enumerate(groups)
        }
        try:
            for future in as_completed(futures):
                yield groups[futures[future]], future.result()
        finally:
            client.cancel(list(futures))


def task_runner(client: Any = None, workers: int = 1) -> TaskRunner:
    """A `ClusterTasks` on `client`, or `workers` threads here."""
    return ThreadTasks(workers) if client is None else ClusterTasks(client)


def chunk_groups(n: int, runner: TaskRunner) -> list[list[int]]:
    """Items ``0..n-1`` in consecutive groups, one task each.

    One item per task on threads, where a task costs nothing and each result
    is reported as it comes; about eight tasks per worker on a cluster, where
    each task has a fixed cost (scheduling, a round trip).

    >>> chunk_groups(3, ThreadTasks(2))
    [[0], [1], [2]]
    """
    size = max(1, n // (8 * runner.workers)) if runner.remote else 1
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]
