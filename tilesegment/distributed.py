"""Run the same plan on a dask.distributed cluster: groups of blocks as tasks.

The client creates the output (and its manifest) and sends every worker the
model once. Each task opens the image itself (`JobSpec.open`) and computes
its blocks through `tilesegment.runner.run_blocks`, the code a local run
uses, so a cluster run on GPUs uploads raw batches and normalizes and
reduces on the device exactly as a local one does. It writes its chunks
straight into the shared zarr store and marks its blocks done. Tasks of a
lost worker are rescheduled by dask (a block's chunks are rewritten whole,
so a retry is harmless). The client finishes the pyramid and metadata.

What "auto" means is decided once, on the client, from what the workers
report of their own devices (`worker_facts`): the precision the record
names is the one every worker runs, and automatic tile and batch sizes fit
the workers' memory, not the client's.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .errors import Cancelled, UsageError
from .options import DeviceFacts, JobSpec

__all__ = ["run_on_cluster", "worker_facts", "BlockTarget"]


@dataclass(frozen=True)
class BlockTarget:
    """Where a task writes: the output's full-resolution array and its manifest (or None)."""

    array_path: str
    manifest_root: Optional[str]
    run_id: str  # names this run's executor on each worker


def _compute_blocks(spec: JobSpec, model: Any, target: BlockTarget, blocks: list[int]) -> tuple[list[int], list[dict]]:
    """Task body: compute and write `blocks`; return them and the tiles that could not be read."""
    import zarr

    from .io.manifest import Manifest
    from .io.sinks import BlockSink
    from .process import exact_fp32
    from .runner import run_blocks

    sink = BlockSink(zarr.open_array(target.array_path, mode="r+"),
                     Manifest(target.manifest_root) if target.manifest_root else None)
    # A worker process runs tasks, not the caller's code: an fp32 task turns TF32 off for itself.
    exact = exact_fp32() if spec.compute.precision == "fp32" else contextlib.nullcontext()
    with spec.open(model) as job, exact:
        done = run_blocks(job, blocks, sink=sink, executors=[_worker_executor(job, target.run_id)], threads=(1, 1))
    return blocks, done.failed_tiles


def _worker_executor(job, run_id: str):
    """One executor per worker and run, kept on the dask worker between tasks."""
    from .runner import make_executors

    try:
        from distributed import get_worker

        cache = get_worker().__dict__.setdefault("_tilesegment_executors", {})
    except (ImportError, ValueError):  # not on a worker (tests call the task body directly)
        cache = {}
    if run_id not in cache:
        cache.clear()  # one run at a time per worker: free the previous run's device copy
        cache[run_id] = make_executors(job, ["auto"])[0]
    return cache[run_id]


def _own_device_facts(memory_budget: Optional[int]) -> DeviceFacts:
    """Task body of `worker_facts`: the device this worker's executor will use ("auto" there)."""
    from .executor import resolve_device

    return DeviceFacts.of(resolve_device("auto"), memory_budget)


def worker_facts(client: Any, memory_budget: Optional[int] = None) -> list[DeviceFacts]:
    """What each worker that will run tasks computes on: its device, what "auto" precision
    means there, and its memory budgets (`memory_budget` replaces them).

    Where workers declare a ``GPU`` resource only they get tasks, so only they are asked.

    Raises
    ------
    UsageError
        If the cluster has no workers, or a worker that declares a GPU sees no CUDA device.
    """
    workers = client.scheduler_info()["workers"]
    gpu = [address for address, w in workers.items() if "GPU" in w.get("resources", {})]
    facts = list(client.run(_own_device_facts, memory_budget, workers=gpu or None).values())
    if not facts:
        raise UsageError("the dask cluster has no workers; start them (or wait for them) before segmenting")
    blind = sum(not f.device.startswith("cuda") for f in facts) if gpu else 0
    if blind:
        raise UsageError(f"{blind} of {len(facts)} dask workers that declare a GPU resource see no CUDA "
                         "device; give each its GPU (CUDA_VISIBLE_DEVICES) or start CPU workers without "
                         "--resources GPU=1")
    return facts


def _groups(plan, pending_blocks: np.ndarray, min_tiles: int) -> list[list[int]]:
    """Consecutive pending blocks grouped into tasks of at least `min_tiles` tiles."""
    counts = np.diff(plan.block_tiles)
    groups, current, size = [], [], 0
    for b in pending_blocks:
        current.append(int(b))
        size += int(counts[b])
        if size >= min_tiles:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def run_on_cluster(job, client, reporter) -> Any:
    """Run a prepared `Job` on a dask.distributed `client`; return the output's zarr array.

    The output must be a path every worker can write (shared storage), and the
    image a path every worker can read. `reporter` (a `tilesegment.contracts.Reporter`)
    hears of each finished group of blocks and may cancel between them.
    """
    from .io.sinks import is_local_path
    from .stitch import Stitcher
    from .tasks import ClusterTasks

    if job.output is None or not is_local_path(job.output):
        raise UsageError("a distributed run writes to a shared OME-Zarr path; pass output=PATH "
                         "(URL outputs such as s3:// run locally, without a scheduler)")
    if job.storage_options:
        raise UsageError("storage_options do not travel to dask workers; configure remote access "
                         "through the environment (AWS_ENDPOINT_URL, AWS_PROFILE...) on every worker")
    spec = job.spec()
    plan = job.plan
    tasks = ClusterTasks(client)
    output = job.final_output()
    with Stitcher(plan, output, job.mode, num_classes=job.num_classes, done_blocks=job.done_blocks) as stitcher:
        sink = stitcher.sink
        target = BlockTarget(os.fspath(sink.path / "0"),
                             os.fspath(sink.path) if sink.manifest is not None else None, uuid.uuid4().hex)
        pending = np.setdiff1d(np.arange(plan.n_blocks), job.done_blocks)
        groups = _groups(plan, pending, min_tiles=4 * job.batch_size)
        counts = np.diff(plan.block_tiles)
        reporter.start(int(counts[pending].sum()), "segment")
        results = tasks.map(_compute_blocks, groups, (spec, job.model, target), name="tilesegment",
                            resources={"GPU": 1} if tasks.has_gpus() else None)
        try:
            for blocks, (_, failed) in results:
                stitcher.mark_written(blocks)  # also in the manifest markers
                stitcher.failed_tiles.extend(failed)
                reporter.advance(int(counts[blocks].sum()))
                if reporter.cancelled():
                    raise Cancelled(job.cancelled_message(reporter))
        except BaseException:
            results.close()  # cancels the tasks that have not started
            sink.keep = True  # tasks already running cannot be stopped and still write
            raise
    return stitcher.result
