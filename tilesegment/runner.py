"""`run_blocks`: the one place that builds a Tiler, Executors and a Stitcher and runs them.

A local `Job.run`, each task of a cluster run (`tilesegment.distributed`)
and the tile-size benchmark (`tilesegment.bench`) all compute their blocks
here, so the choices that could make two paths disagree are made once:
which tiles to compute and which to fill, whether batches travel raw and
are normalized on the device, where results are reduced, how many reader
and writer threads serve the devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from .errors import Cancelled
from .executor import Executor
from .pipeline import run_pipeline
from .report import TqdmReporter
from .stitch import Stitcher

if TYPE_CHECKING:
    from .api import Job
    from .contracts import Reporter, Sink

__all__ = ["run_blocks", "make_executors", "BlocksDone"]


@dataclass
class BlocksDone:
    """What `run_blocks` leaves: the result, and the tiles that could not be read."""

    result: Any
    failed_tiles: list[dict] = field(default_factory=list)


def raw_inputs(job: "Job", devices: Sequence[Any]) -> bool:
    """Whether batches travel in the image's 1-byte dtype and are normalized on the device:
    by default on GPUs, where it saves 3/4 of the host work and the bus traffic."""
    dtype = job.tiler.input_dtype
    if dtype.itemsize != 1 or dtype.kind not in "ui":
        return False
    chosen = job.compute.raw_inputs
    return all(d.type == "cuda" for d in devices) if chosen is None else bool(chosen)


def make_executors(job: "Job", devices: Optional[Sequence[Any]] = None) -> list[Executor]:
    """One `Executor` per device (default: the job's), each with its own copy of the model."""
    from .executor import resolve_device

    devices = [resolve_device(d) for d in (devices if devices is not None else job.devices)]
    affine = (job.tiler.scale, job.tiler.offset) if raw_inputs(job, devices) else None
    options, plan = job.compute, job.plan
    return [
        Executor(job.model, device, precision=options.precision, mode=job.mode, geometry=plan.geometry,
                 tile_size=plan.tile_size, compile=options.compile, memory_budget=options.memory_budget,
                 input_affine=affine, reduce_on_device=options.reduce_on_device)
        for device in devices
    ]


def run_blocks(
    job: "Job",
    blocks: Optional[Sequence[int]],
    reporter: Optional["Reporter"] = None,
    *,
    sink: Optional["Sink"] = None,
    executors: Optional[Sequence[Executor]] = None,
    threads: Optional[tuple[int, int]] = None,
) -> BlocksDone:
    """Compute and write `blocks` of `job`'s plan.

    Parameters
    ----------
    job : Job
        The prepared run (its image open).
    blocks : sequence of int, optional
        Plan blocks to compute; None: every block a stopped run did not finish.
    reporter : Reporter, optional
        Hears ``start(tiles)`` and ``advance(n)`` per batch; ``cancelled()``
        stops the run between batches with `Cancelled`, keeping what it wrote.
    sink : Sink, optional
        Where the blocks go. None: the job's own output, created (or reopened,
        when resuming) here, or a numpy array when the job has none. A cluster
        task passes a `BlockSink` into the output its client created.
    executors : sequence of Executor, optional
        Default: `make_executors` on the job's devices. A cluster worker
        passes the one it keeps between tasks.
    threads : (readers, writers), optional
        Default: the job's (`Job.readers`, `Job.writers`).

    Returns
    -------
    BlocksDone
        The sink's result, and the tiles that could not be read.
    """
    reporter = reporter or TqdmReporter(enabled=False)
    plan = job.plan
    mine = _blocks_mask(plan, np.arange(plan.n_blocks) if blocks is None else blocks, job.done_blocks)
    tiles = plan.tiles_in(mine)
    tissue = np.ones(plan.n_tiles, bool) if job.tissue is None else job.tissue
    todo, skipped = np.flatnonzero(tiles & tissue), np.flatnonzero(tiles & ~tissue)
    executors = list(executors) if executors is not None else make_executors(job)
    readers, writers = threads if threads is not None else (job.readers, job.writers)
    for executor in executors:
        executor.precision_context()  # fp32 with TF32 on is refused here, before anything is written
    normalize = not executors[0].takes_raw
    # Reading starts here, so the first batch is read while the output is created.
    batches = job.tiler.batches(
        job.compute.batch_size, tiles=None if len(todo) == plan.n_tiles else todo,
        prefetch=2 * len(executors), workers=readers, allocate=executors[0].host_buffer,
        normalize=normalize, channels_last=executors[0].channels_last,
    )
    done_elsewhere = np.flatnonzero(~mine)
    try:
        if sink is None and job.destination is not None:
            output = job.final_output(writers=writers)
            stitcher = Stitcher(plan, output, job.mode, num_classes=job.num_classes, done_blocks=done_elsewhere)
        else:
            stitcher = Stitcher(plan, mode=job.mode, num_classes=job.num_classes, sink=sink,
                                done_blocks=done_elsewhere)
        with stitcher:
            reporter.start(len(todo), "segment")
            run_pipeline(batches, executors, stitcher, reporter.advance, skipped=skipped,
                         cancelled=reporter.cancelled)
    except Cancelled:
        raise Cancelled(job.cancelled_message(reporter)) from None
    finally:
        batches.close()
    return BlocksDone(stitcher.result, stitcher.failed_tiles)


def _blocks_mask(plan, blocks: Sequence[int], done: np.ndarray) -> np.ndarray:
    mine = np.zeros(plan.n_blocks, bool)
    mine[np.asarray(blocks, np.int64)] = True
    mine[np.asarray(done, np.int64)] = False
    return mine
