"""Run the same plan on a dask.distributed cluster: groups of blocks as tasks.

The client creates the output (and its manifest) and scatters the model to
every worker once. Each task opens the image itself, computes its blocks'
tiles with the same loader, executor and stitcher kernels as a local run, and
writes its chunks straight into the shared zarr store, then marks the blocks
done. Tasks of a lost worker are rescheduled by dask (a block's chunks are rewritten whole,
so a retry is harmless). The client finishes the pyramid and metadata.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .errors import UsageError
from .geometry import Geometry, Pair
from .io.sources import ReadOptions
from .models.planes import PlaneWise

__all__ = ["run_on_cluster", "BlockSpec"]


@dataclass(frozen=True)
class BlockSpec:
    """Everything a worker needs to compute blocks of a plan (plain, picklable values)."""

    image: str
    read: ReadOptions
    geometry: Geometry
    tile_size: Pair
    chunk_size: Pair
    padding: str
    mode: str
    num_classes: int
    batch_size: int
    precision: str
    array_path: str
    manifest_root: Optional[str]
    compute: Optional[np.ndarray]  # per tile, or None for all
    on_error: str
    run_id: str  # names this run's tasks and its executor on each worker
    axes: str  # the plan's axes, as the client opened the image
    network_ndim: int  # spatial axes of the network itself: how the image is opened


def _compute_blocks(spec: BlockSpec, blocks: list[int], model: Any) -> tuple[list[int], list[dict]]:
    """Task body: compute and write `blocks`; return them and the tiles that could not be read."""
    import zarr

    from .io.manifest import Manifest
    from .io.sinks import BlockSink
    from .pipeline import run_pipeline
    from .stitch import Stitcher
    from .tiler import Tiler

    if spec.geometry.ndim > 2:
        from ._heap import return_large_buffers

        return_large_buffers()
    source = spec.read.open(spec.image, ndim=spec.network_ndim)
    if source.plan_axes.lower() != spec.axes:
        raise UsageError(f"{spec.image} has axes {source.plan_axes} on this worker but "
                         f"{spec.axes.upper()} on the client; is it the same file?")
    with Tiler(source, spec.geometry, spec.tile_size, chunk_size=spec.chunk_size, padding=spec.padding,
               normalization=model.normalization, on_error=spec.on_error) as tiler:
        plan = tiler.plan
        mine = np.zeros(plan.n_blocks, bool)
        mine[blocks] = True
        tiles = np.flatnonzero(plan.tiles_in(mine))
        compute = np.ones(plan.n_tiles, bool) if spec.compute is None else spec.compute
        sink = BlockSink(zarr.open_array(spec.array_path, mode="r+"),
                         Manifest(spec.manifest_root) if spec.manifest_root else None)
        stitcher = Stitcher(plan, mode=spec.mode, num_classes=spec.num_classes, sink=sink,
                            done_blocks=np.flatnonzero(~mine))
        todo, skipped = tiles[compute[tiles]], tiles[~compute[tiles]]
        executor = _worker_executor(model, spec)
        batches = tiler.batches(spec.batch_size, tiles=todo, workers=1, channels_last=executor.channels_last)
        run_pipeline(batches, [executor], stitcher, skipped=skipped)
        stitcher.close()
    return blocks, stitcher.failed_tiles


def _worker_executor(model: Any, spec: BlockSpec):
    """One executor per worker and model, kept on the dask worker between tasks."""
    from .executor import Executor

    try:
        from distributed import get_worker

        cache = get_worker().__dict__.setdefault("_tilesegment_executors", {})
    except (ImportError, ValueError):  # not on a worker (tests call the task body directly)
        cache = {}
    if spec.run_id not in cache:
        cache.clear()  # one run at a time per worker: free the previous run's device copy
        cache[spec.run_id] = Executor(model, "auto", precision=spec.precision, mode=spec.mode,
                                      geometry=spec.geometry, tile_size=spec.tile_size)
    return cache[spec.run_id]


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


def run_on_cluster(job, client, reporter):
    """Run a prepared `Job` on a dask.distributed `client`; return ``(zarr array, stats)``.

    The output must be a path every worker can write (shared storage), and the
    image a path every worker can read. `reporter` (a `tilesegment.report.Reporter`)
    hears of each finished group of blocks and may cancel between them.
    """
    import time

    from distributed import as_completed

    from .io.sinks import is_local_path
    from .errors import Cancelled
    from .report import RunStats
    from .stitch import Stitcher

    if job.output is None or not is_local_path(job.output):
        raise UsageError("a distributed run writes to a shared OME-Zarr path; pass output=PATH "
                         "(URL outputs such as s3:// run locally, without a scheduler)")
    if job.storage_options:
        raise UsageError("storage_options do not travel to dask workers; configure remote access "
                         "through the environment (AWS_ENDPOINT_URL, AWS_PROFILE...) on every worker")
    image = job.image_path
    if image is None:
        raise UsageError("a distributed run reads the image on the workers; pass a file path, "
                         "not an array, as the image")
    plan = job.plan
    start = time.perf_counter()
    num_classes = job.num_classes
    stitcher = Stitcher(plan, job.destination, job.mode, num_classes=num_classes,
                        pixel_size=job.tiler.source.pixel_size, record=job.record,
                        done_blocks=job.done_blocks, class_names=job.class_names)
    with stitcher:
        sink = stitcher.sink
        spec = BlockSpec(
            image=os.fspath(image), read=job.read, geometry=plan.geometry,
            tile_size=plan.tile_size, chunk_size=plan.chunk_size, padding=job.tiler.padding,
            mode=job.mode, num_classes=num_classes, batch_size=job.batch_size,
            precision=job.precision, array_path=os.fspath(sink.path / "0"),
            manifest_root=os.fspath(sink.path) if sink.manifest is not None else None,
            compute=job.compute, on_error=job.tiler.on_error, run_id=uuid.uuid4().hex,
            axes=plan.axes,
            network_ndim=plan.geometry.ndim - (job.model.stack_axes if isinstance(job.model, PlaneWise) else 0),
        )
        pending = np.setdiff1d(np.arange(plan.n_blocks), job.done_blocks)
        groups = _groups(plan, pending, min_tiles=4 * job.batch_size)
        gpu = any("GPU" in w.get("resources", {}) for w in client.scheduler_info()["workers"].values())
        model = client.scatter(job.model, broadcast=True, hash=False)
        # No retries: the scheduler already reschedules the tasks of a worker that dies
        # (allowed-failures); a task that raises (NaN, corrupt tile) would only fail again.
        futures = [
            client.submit(_compute_blocks, spec, group, model, pure=False,
                          key=f"tilesegment-{spec.run_id}-{group[0]}",
                          resources={"GPU": 1} if gpu else None)
            for group in groups
        ]
        counts = np.diff(plan.block_tiles)
        reporter.start(int(counts[pending].sum()), "segment")
        try:
            for future in as_completed(futures):
                blocks, failed = future.result()  # also in the manifest markers
                stitcher.mark_written(blocks)
                stitcher.failed_tiles.extend(failed)
                reporter.advance(int(counts[blocks].sum()))
                if reporter.cancelled():
                    raise Cancelled(job.cancelled_message(reporter))
        except BaseException:
            client.cancel(futures)
            sink.keep = True  # tasks already running cannot be stopped and still write
            raise
        finally:
            reporter.close()
    stats = RunStats(tiles=plan.n_tiles, tile_size=plan.tile_size, input_size=plan.input_size,
                     batch_size=job.batch_size, device=f"cluster ({len(client.scheduler_info()['workers'])} workers)",
                     seconds=time.perf_counter() - start, pixels=job.pending_pixels,
                     skipped=len(job.skipped), resumed=int((~job.pending).sum()))
    return stitcher.result, stats
