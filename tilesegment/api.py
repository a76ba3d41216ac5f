"""`segment()`: open source -> plan -> run the executor -> stitch -> finish the sink."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ._probe import model_out_channels
from .errors import ModelError, UsageError
from .executor import PRECISIONS, Executor, auto_batch_size, default_budget, resolve_devices
from .options import ComputeOptions, DeviceFacts, InstanceRecipe, JobSpec, PlanOptions
from .geometry import Geometry, Shape, compact
from .io.manifest import input_identity
from .io.output import Output
from .io.remote import is_url
from .io.sinks import is_local_path
from .io.sources import ImageLike, ReadOptions
from .models.base import describe
from .models.load import ModelSpec, load_model
from .models.planes import PlaneWise
from .report import Cancel, Reporter, RunStats, as_reporter, progress_of
from .modes import get_mode
from .runner import make_executors, run_blocks
from .tiler import Tiler, check_axes
from .tissue import MaskLike, load_mask

__all__ = ["segment", "prepare", "Job", "RunStats", "auto_tile_size"]


def auto_tile_size(
    shape: Shape,
    geometry: Geometry,
    device: torch.device,
    model: Optional[torch.nn.Module] = None,
    in_channels: int = 3,
    memory_budget: Optional[int] = None,
) -> Shape:
    """Default tile size per axis, from the cost model of the halo against memory.

    Images: computed pixels per written pixel fall with the tile size (1.87
    at 512, 1.40 at 1024, 1.19 at 2048 for a depth-4 U-Net), so a GPU gets
    the largest of 512, 1024 and 2048 whose activations for a batch of two
    fit the memory budget (70 % of free device memory; per-tile need from a
    meta-device probe). On CPU, the measured optimum is 512 (benchmarks.md:
    larger tiles lose more to cache misses than they save in halo).

    Volumes: each axis gets an edge in proportion to the network's step
    along it, so an anisotropic network (pooling 1 x 2 x 2 on its first
    levels: z step 4 against 16 in y and x) gets tiles four times thinner in
    z, where its voxels are coarser; the largest such tile (y/x edge 256,
    128, 64 or 32) whose activations for a batch of two fit the budget (70 %
    of free device memory; on CPU a quarter of RAM, at most 8 GB) is taken.

    Never much larger than the image.
    """
    if geometry.ndim == 2:
        target: tuple[int, ...] = (512, 512)
        if device.type == "cuda" and model is not None:
            from .executor import estimate_bytes_per_tile

            if memory_budget is None:
                memory_budget = default_budget(device, "plan")
            for t in (1024, 2048):
                if 2 * estimate_bytes_per_tile(model, in_channels, geometry.input_size(t)) <= memory_budget:
                    target = (t, t)
    else:
        target = _auto_volume_tile(shape, geometry, device, model, in_channels, memory_budget)
    return tuple(  # type: ignore[return-value]
        max(st, min(max(st, t // st * st), math.ceil(n / st) * st))
        for n, st, t in zip(shape, geometry.step, target)
    )


def volume_tile(edge: int, geometry: Geometry, shape: Sequence[int]) -> tuple[int, ...]:
    """A volume tile whose y/x edge is about `edge`, each axis in proportion to the network's
    step along it (multiples of it), never much larger than the volume `shape`."""
    widest = max(geometry.step)
    tile = tuple(max(st, edge * st // widest // st * st) for st in geometry.step)
    return tuple(min(t, math.ceil(n / st) * st) for t, n, st in zip(tile, shape, geometry.step))


def _auto_volume_tile(shape, geometry: Geometry, device: torch.device, model, in_channels: int,
                      budget: Optional[int]) -> tuple[int, ...]:
    from .executor import estimate_bytes_per_tile

    if budget is None:
        budget = default_budget(device, "plan")
    for edge in (256, 128, 64, 32):
        tile = volume_tile(edge, geometry, shape)
        if model is None or 2 * estimate_bytes_per_tile(model, in_channels, geometry.input_size(tile)) <= budget:
            return tile
    return tile


@dataclass(frozen=True, eq=False, kw_only=True)
class Job:
    """A validated segmentation run: every input checked, nothing computed yet.

    Make one with `prepare`; `run` does the work. The CLI prints the plan in
    between. The image stays open between runs, so a job can run again (a
    GUI re-running a region, a benchmark); `close()`, or ``with job:``,
    releases it. The settings are plain values: `read` (which pixels),
    ``tiler.plan`` (how they are cut), `compute` (how the network runs) and
    `destination` (where the result goes); `spec` packs them for a cluster.
    """

    model: torch.nn.Module
    tiler: Tiler
    mode: str
    compute: ComputeOptions
    destination: Optional[Output] = None  # the OME-Zarr to write (None: a numpy result)
    tissue: Optional[np.ndarray] = None  # per tile: computed (True) or filled as background
    record: Optional[dict] = None  # identity of the run, for the output's manifest
    done_blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    image_path: Optional[str] = None  # for workers that open the image themselves
    read: ReadOptions = field(default_factory=ReadOptions)
    num_classes: int = 1
    storage_options: Optional[dict] = None  # fsspec options of URL inputs and outputs
    instances: Optional[InstanceRecipe] = None  # how objects are made, recorded in the output

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """The devices this machine runs the network on, one executor each."""
        return tuple(torch.device(d) for d in self.compute.devices)

    @property
    def batch_size(self) -> int:
        """Tiles per forward pass."""
        return self.compute.batch_size

    @property
    def output(self) -> Any:
        """Where the result goes: a path, URL or store, or None for a numpy result."""
        return None if self.destination is None else self.destination.target

    @property
    def resume(self) -> bool:
        """Whether the run continues an output that a stopped run left."""
        return self.destination is not None and self.destination.resume

    @property
    def class_names(self) -> Optional[list]:
        """Class names the model carries (checkpoint metadata ``classes``), if any."""
        return self.model.metadata.get("classes")

    @property
    def source(self) -> Optional[dict]:
        """Where the pixels came from, for the output's ``tilesegment.source``: the file's
        absolute path (or URL) and its read options; None for an array in memory."""
        if self.image_path is None:
            return None
        path = self.image_path if is_url(self.image_path) else os.path.abspath(self.image_path)
        return {"path": path, **self.read.to_dict()}

    def final_output(self, **settings: Any) -> Output:
        """`destination` with what the run knows of its result: pixel size, record, class names,
        instance recipe (and `settings`, such as the writer threads), for `run`, which holds
        its lock."""
        return replace(self.destination, pixel_size=self.tiler.source.pixel_size, record=self.record, locked=True,
                       class_names=self.class_names, source=self.source,
                       instances=None if self.instances is None else self.instances.to_dict(), **settings)

    @property
    def pending(self) -> np.ndarray:
        """Per tile: still to be written (not in a block a stopped run finished)."""
        return ~self.plan.tiles_in(self.done_blocks)

    def cancelled_message(self, reporter: Reporter) -> str:
        """What a cancelled run says: how far it got, and how to go on."""
        done = progress_of(reporter)
        stopped = f"run cancelled {done} tiles" if done else "run cancelled"
        if self.destination is None:
            return f"{stopped}; the in-memory result is dropped"
        if self.destination._recorded and not self.destination.saved_blocks():  # removed: nothing to resume
            return f"{stopped} before a block was finished; {str(self.output)!r} was not kept"
        return (f"{stopped}; the finished blocks are kept in {str(self.output)!r}: run again "
                "with resume=True (CLI: --resume) to continue")

    @property
    def pending_pixels(self) -> int:
        """Output pixels this run writes: every one, less those of blocks a stopped run finished."""
        plan, pending = self.plan, self.pending
        if pending.all():
            return int(np.prod(plan.shape))
        origins = plan.origins[pending]
        ends = np.minimum(origins + np.asarray(plan.tile_size), plan.shape)
        return int(np.prod(ends - origins, axis=1).sum())

    @property
    def skipped(self) -> np.ndarray:
        """Plan indices of tiles that are filled as background, not computed."""
        if self.tissue is None:
            return np.zeros(0, np.int64)
        return np.flatnonzero(~self.tissue & self.pending)

    @property
    def plan(self):
        return self.tiler.plan

    @property
    def plan_options(self) -> PlanOptions:
        """How the image is cut: tile size, output chunk size, padding."""
        return PlanOptions(self.plan.tile_size, self.plan.chunk_size, self.tiler.padding)

    @property
    def _on_cpu(self) -> bool:
        return all(d.type == "cpu" for d in self.devices)

    @property
    def readers(self) -> int:
        """Reader threads. On CPU the cores belong to the network: one reader, or
        two when the source has to be decoded (a second one hides decoding
        behind gathering; docs/benchmarks.md). On GPUs every core but one per
        device thread, to decode and gather for them."""
        if self._on_cpu:
            return 1 if self.tiler.source.chunk_shape is None else 2
        return max(2, (os.cpu_count() or 2) - len(self.devices))

    @property
    def writers(self) -> int:
        """Threads that compress and write finished blocks: one on CPU; on GPUs
        half the cores (writing costs about a third of reading per pixel)."""
        return 1 if self._on_cpu else max(2, (os.cpu_count() or 2) // 2)

    def spec(self) -> JobSpec:
        """The settings of this job as picklable values, for workers that open the image
        themselves (`JobSpec.open`).

        Raises
        ------
        UsageError
            If the image is an array in memory, which workers cannot open.
        """
        if self.image_path is None:
            raise UsageError("a distributed run reads the image on the workers; pass a file path, "
                             "not an array, as the image")
        plan = self.plan
        return JobSpec(
            image=self.image_path, read=self.read, storage_options=self.storage_options,
            network_ndim=plan.geometry.ndim - (self.model.stack_axes if isinstance(self.model, PlaneWise) else 0),
            axes=plan.axes,
            geometry=plan.geometry,
            plan=self.plan_options, compute=self.compute,
            mode=self.mode, num_classes=self.num_classes, on_error=self.tiler.on_error, tissue=self.tissue,
        )

    def close(self) -> None:
        """Close the image file the job reads (it reopens nothing: a closed job cannot run)."""
        self.tiler.close()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def executors(self) -> list[Executor]:
        """One executor per device, each with its own copy of the model on it."""
        return make_executors(self)

    def run(self, progress: Union[bool, Callable[[int, int], Any], Reporter] = True, client: Any = None,
            cancel: Cancel = None) -> tuple[Any, RunStats]:
        """Segment, write the output and return ``(result, stats)``.

        With a dask.distributed `client`, blocks run as tasks on its workers
        (see `tilesegment.distributed`); both paths compute through
        `tilesegment.runner.run_blocks`. `progress` and `cancel` are those of
        `segment`; a cancelled run raises `Cancelled` and keeps what it finished.

        An output is written by one run at a time: the run holds the output's
        lock (`tilesegment.io.lock`; on the client, for a cluster run) from
        before it writes anything until it ends, however it ends.

        Raises
        ------
        OutputBusyError
            If another live run writes the output; the message names it.
        """
        reporter = as_reporter(progress, cancel)
        start = time.perf_counter()
        lock = None if self.destination is None else self.destination.lock("segment")
        try:
            with lock if lock is not None else contextlib.nullcontext():
                if client is not None:
                    from .distributed import run_on_cluster

                    result = run_on_cluster(self, client, reporter)
                    where = f"cluster ({len(client.scheduler_info()['workers'])} workers)"
                else:
                    result = run_blocks(self, None, reporter).result
                    where = ", ".join(str(d) for d in self.devices)
        finally:
            reporter.close()
        stats = RunStats(
            tiles=self.plan.n_tiles, tile_size=self.plan.tile_size, input_size=self.plan.input_size,
            batch_size=self.batch_size, device=where,
            seconds=time.perf_counter() - start, pixels=self.pending_pixels, skipped=len(self.skipped),
            resumed=int((~self.pending).sum()),
        )
        return result, stats


def prepare(
    image: ImageLike,
    model: ModelSpec,
    output: Union[None, str, os.PathLike, Any] = None,
    *,
    tile_size: Union[int, tuple[int, ...], str, None] = "auto",
    batch_size: Union[int, str, None] = "auto",
    device: Union[str, torch.device] = "auto",
    mode: str = "labels",
    padding: str = "reflect",
    level: int = 0,
    axes: Optional[str] = None,
    chunk_size: Union[int, tuple[int, ...], None] = None,
    overwrite: bool = False,
    precision: str = "auto",
    compile: Union[bool, str] = False,
    memory_budget: Optional[int] = None,
    mpp: Optional[float] = None,
    series: int = 0,
    channels: Optional[Sequence[int]] = None,
    tissue_mask: MaskLike = None,
    resume: bool = False,
    on_error: str = "raise",
    ngff: str = "0.5",
    storage_options: Optional[dict] = None,
    client: Any = None,
    instances: Union[None, dict, InstanceRecipe] = None,
) -> Job:
    """Check every argument of `segment` and plan the run, without computing anything.

    Takes the parameters of `segment` (except `progress` and `cancel`, which
    are `Job.run`'s) and returns a `Job`; raises the same errors `segment`
    would, before any work. "auto" precision, tile size and batch size are
    resolved here, once, for the devices that will run the network; the run
    record and every executor use the resolved values. With a dask `client`
    the workers report their own devices (`tilesegment.distributed.worker_facts`),
    `device` is not used, and the job runs with ``job.run(client=client)``.
    """
    get_mode(mode)  # an unknown mode fails here, before anything is opened
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    destination = Output(output, overwrite=overwrite, resume=resume, ngff=ngff, storage_options=storage_options)
    destination.check(image)
    ngff = destination.ngff
    model = describe(load_model(model))
    recipe = _instance_recipe(instances, model)
    geometry = model.geometry
    devices = [] if client is not None else resolve_devices(device)
    read = ReadOptions(axes=axes, level=level, series=series, channels=channels, mpp=mpp)
    source = read.open(image, storage_options, ndim=geometry.ndim)
    check_axes(source, geometry)
    target, precision = _resolve_target(devices, client, precision, memory_budget)
    sized_for = torch.device(target.device)
    if tile_size in ("auto", None):
        tile_size = auto_tile_size(source.shape[source.ndim - geometry.ndim:], geometry, sized_for, model,
                                   source.channels, target.plan_budget)
    else:
        tile_size = _within_image(tile_size, source.shape, geometry)
    tiler = Tiler(source, geometry, tile_size=tile_size, chunk_size=chunk_size, padding=padding,
                  normalization=model.normalization, on_error=on_error)
    identity = model.identity()  # of the network itself, however it is run
    if tiler.plan.geometry.ndim > geometry.ndim:  # a 2-d network over a Z/T stack
        model = PlaneWise(model, tiler.plan.geometry.ndim - geometry.ndim)
    if tissue_mask is not None and tiler.plan.geometry.ndim != 2:
        raise UsageError(f"tissue_mask works on 2-d images; {source.name} has axes {source.plan_axes} "
                         "(volumes and stacks are computed everywhere)")
    _check_channels(model, tiler)
    _check_tile_fits(model, sized_for, source.channels, tiler.plan, target.limit_budget)
    if batch_size in ("auto", None):
        batch_size = auto_batch_size(model, sized_for, source.channels, tiler.plan.input_size, target.plan_budget)
    if int(batch_size) < 1:
        raise UsageError(f"batch_size {batch_size} must be at least 1")
    mask = load_mask(tissue_mask, source)
    tissue = None if mask is None else tiler.plan.tiles_touching(mask, margin=0)
    num_classes = model.num_classes or model_out_channels(model, model.geometry)
    record, done = None, None
    if output is not None and (is_local_path(output) or is_url(output)):
        record = {
            "input": input_identity(image, source), "model": identity, "mode": mode,
            **PlanOptions(tiler.plan.tile_size, tiler.plan.chunk_size, padding).to_dict(),
            **read.to_dict(), "on_error": on_error,
            "precision": precision,
            "tissue_mask": _mask_identity(tissue_mask, mask),
        }
        if ngff != "0.5":  # only then, so unfinished 0.5 outputs of older versions still resume
            record["ngff"] = ngff
        done = destination.done_blocks(record)
        if done is None:
            kind = get_mode(mode)  # expected compressed bytes, plus a third for the pyramid
            need = math.prod(tiler.plan.shape) * kind.bytes_per_pixel(num_classes) * kind.compression * 4 / 3
            destination.check_space(need, f"{mode}, {' x '.join(map(str, tiler.plan.shape))} px")
    image_path = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
    storage_options = dict(storage_options) if storage_options else None
    options = ComputeOptions(devices=tuple(str(d) for d in devices) or (target.device,), precision=precision,
                             batch_size=int(batch_size), compile=compile, memory_budget=memory_budget)
    return Job(
        model=model, tiler=tiler, mode=mode, compute=options,
        destination=None if output is None else replace(destination, resume=done is not None),
        tissue=tissue, record=record, done_blocks=np.zeros(0, np.int64) if done is None else done,
        image_path=image_path, read=read, num_classes=num_classes, storage_options=storage_options,
        instances=recipe,
    )


def _instance_recipe(instances: Any, model: Any) -> Optional[InstanceRecipe]:
    """The recipe given, else the model's (metadata ``instances``), checked against its classes."""
    if instances is None:
        found = model.metadata.get("instances")
        if found is None:
            return None
        recipe = InstanceRecipe.from_dict(found, "the model's instance recipe (metadata 'instances')")
    else:
        recipe = InstanceRecipe.from_dict(instances, "instances")
    if model.num_classes is not None:
        for k in recipe.classes + recipe.grow_into:
            if k >= model.num_classes:
                raise UsageError(f"instance recipe class {k} is out of range: the model has classes "
                                 f"0..{model.num_classes - 1}")
    return recipe


def _resolve_target(devices: Sequence[torch.device], client: Any, precision: str,
                    memory_budget: Optional[int]) -> tuple[DeviceFacts, str]:
    """The device automatic sizes are planned for, and the precision every executor runs:
    this machine's devices, or the workers' of a dask `client` (whose own devices do not run)."""
    if client is None:
        return DeviceFacts.common([DeviceFacts.of(d, memory_budget) for d in devices], precision, "the devices")
    from .distributed import worker_facts

    return DeviceFacts.common(worker_facts(client, memory_budget), precision, "the dask workers")


def _mask_identity(spec: MaskLike, mask: Optional[np.ndarray]) -> Optional[str]:
    """How the tissue mask was asked for, with a hash of what it is (for resume checks)."""
    if mask is None:
        return None
    import hashlib

    digest = hashlib.sha256(np.packbits(mask).tobytes() + str(mask.shape).encode()).hexdigest()[:16]
    return f"{spec if isinstance(spec, str) and spec == 'auto' else 'given'}:{digest}"


def segment(
    image: ImageLike,
    model: ModelSpec,
    output: Union[None, str, os.PathLike, Any] = None,
    *,
    tile_size: Union[int, tuple[int, ...], str, None] = "auto",
    batch_size: Union[int, str, None] = "auto",
    device: Union[str, torch.device] = "auto",
    mode: str = "labels",
    padding: str = "reflect",
    level: int = 0,
    axes: Optional[str] = None,
    chunk_size: Union[int, tuple[int, ...], None] = None,
    overwrite: bool = False,
    precision: str = "auto",
    compile: Union[bool, str] = False,
    memory_budget: Optional[int] = None,
    mpp: Optional[float] = None,
    series: int = 0,
    channels: Optional[Sequence[int]] = None,
    tissue_mask: MaskLike = None,
    resume: bool = False,
    on_error: str = "raise",
    ngff: str = "0.5",
    storage_options: Optional[dict] = None,
    progress: Union[bool, Callable[[int, int], Any], Reporter] = True,
    client: Any = None,
    cancel: Cancel = None,
    instances: Union[None, dict, InstanceRecipe] = None,
) -> Any:
    """Segment `image` with `model`, tile by tile, as whole-image inference would (exactly in fp32).

    The result equals one forward pass over the whole mirror-padded image up
    to float32 rounding, for every valid tile size, when the network runs in
    fp32: always on CPU, and on GPUs with ``precision="fp32"`` inside
    `exact_fp32` (the GPU default, bf16, changes labels at near ties).

    Parameters
    ----------
    image : path, URL, numpy, zarr or dask array
        TIFF/SVS/OME-TIFF/NDPI or zarr path or URL (read lazily), or an array of
        shape (Y, X), (Y, X, S) with S in {3, 4}, or (C, Y, X); for a 3-d
        network (Z, Y, X) or (C, Z, Y, X). Z and T axes larger than 1 make a
        volume or a stack (docs/volumes.md). Integer images are scaled to
        [0, 1] by their dtype's range; floats pass through.
    model : torch.nn.Module, path or str
        The network, or anything `load_model` accepts.
    output : None, path, URL or zarr store
        None returns a numpy array; a path, URL (``s3://bucket/out.zarr``) or
        store gets an OME-Zarr image and the full-resolution ``zarr.Array``
        is returned.
    tile_size : int, tuple of int or "auto"
        Edge of the written tile, a multiple of the network step: one for
        every axis or one per axis (``(32, 256, 256)`` for a volume). The
        network input is ``geometry.input_size(tile_size)``. "auto": see
        `auto_tile_size` (512 on CPU; on GPU the largest of 512/1024/2048 that
        fits memory; volumes per axis in proportion to the step). A pure
        speed knob: the result is the same for every valid tile size.
    batch_size : int or "auto"
        Tiles per forward pass. "auto": 1 on CPU (fastest there); on CUDA
        what fits `memory_budget` (default 70 % of free device memory). On
        out-of-memory the batch is halved and retried; no tile is lost.
    device : str or list of str
        ``"auto"``, ``"cpu"``, ``"cuda"`` (every GPU), ``"cuda:N"``, or a list
        such as ``["cuda:0", "cuda:1"]``: one executor per device, fed from
        the same queue. With `client`, each worker uses its own device instead.
    mode : {"labels", "probabilities", "logits"}
        ``labels``: (Y, X) uint8 argmax; ``probabilities``: (C, Y, X) uint8
        softmax * 255; ``logits``: (C, Y, X) float32. Volumes and stacks add
        their axes: (C, Z, Y, X), and time first, (T, C, ...), as NGFF wants.
    padding : str
        Pixels outside the image: "reflect" (default), "symmetric", "edge", "constant".
    level : int
        Pyramid level of a file to segment.
    axes : str, optional
        Override the image's axes, e.g. "CYX", or "ZYX" for a Z stack held as
        a 3-d array.
    chunk_size : int or (int, int), optional
        Output chunk edge; must divide the tile size or be a multiple of it.
    overwrite : bool
        Replace an existing output (swapped in only when the new one is complete).
    progress : bool, callable or Reporter
        True/False: a progress bar in the terminal, or none; a callable:
        called with ``(tiles_done, tiles_total)`` as batches finish (return
        False to cancel); a `tilesegment.report.Reporter` (a GUI's bar).
    cancel : threading.Event or callable, optional
        Set the event (or return True) to stop the run between batches,
        within one batch's time. The finished blocks stay in the output with
        the record a killed run leaves (``resume=True`` continues it), and
        `Cancelled` is raised.
    precision : {"auto", "fp32", "bf16", "fp16"}
        Autocast precision: "auto" is bf16 on GPUs that support it, fp32 on CPU,
        resolved once for the devices that run (with `client`, the workers').
        Exactness holds in fp32 only (on a GPU inside `exact_fp32`); bf16 and
        fp16 round every logit and change labels where the top two logits
        nearly tie (< 0.1 % of pixels).
    compile : bool or str
        Run the model through ``torch.compile``; a string is its mode:
        ``"reduce-overhead"`` replays CUDA graphs (one launch per batch).
    memory_budget : int, optional
        Bytes of device memory a batch may use (auto batch size and splitting).
    mpp : float, optional
        Segment at this pixel size (um/px): the finest pyramid level not finer
        than it is read and area-resampled; the output keeps that pixel size.
    series : int
        Series of a multi-series TIFF.
    channels : sequence of int, optional
        Image channels to feed the model, in its order.
    tissue_mask : None, "auto", array or path
        Compute only tiles whose padded input touches tissue; the others are
        written as background (label 0, probability of class 0 = 255, logits
        0). "auto" thresholds saturation (Otsu) on a low-resolution level.
        2-d images only.
    on_error : {"raise", "skip"}
        A tile that cannot be read (corrupt JPEG tile): stop with its position,
        or fill it as background and list it in the output's metadata
        (``tilesegment.failed_tiles``).
    storage_options : dict, optional
        fsspec options for URL inputs and outputs (``s3://``, ``gs://``,
        ``https://``), e.g. ``{"anon": True}`` or ``{"endpoint_url": ...}``;
        by default the usual environment (``AWS_ENDPOINT_URL``,
        ``AWS_PROFILE``...) applies. See docs/remote.md.
    ngff : {"0.5", "0.4"}
        OME-Zarr version of a file output: "0.5" (zarr v3, the default) or
        "0.4" (zarr v2, for QuPath and older napari-ome-zarr / ome-zarr-py).
    resume : bool
        Continue an output that a stopped run left (killed, Ctrl-C, error):
        its manifest must show the same input, model, tile size, mode and
        other settings; finished blocks are not computed again.
    client : dask.distributed.Client, optional
        Run the blocks as tasks on this cluster; the image and the output must
        be paths all workers can reach. "auto" precision, tile and batch size
        are resolved for the workers' devices, which they report when the run
        is planned. The result equals a local run's with the same settings.
    instances : dict or InstanceRecipe, optional
        How the objects of this model are made (``{"classes": [2],
        "grow_into": [3], "grow": 3}``: seeds and growth, see
        `label_objects`), recorded in the output for `label_objects`.
        Default: the recipe in the model's metadata (``instances``), if any.

    Returns
    -------
    numpy.ndarray or zarr.Array

    Raises
    ------
    InputError, ModelError, UsageError, OutputExistsError
        Before any work starts, with a message that says what to do.

    Examples
    --------
    >>> import numpy as np, tilesegment as ts
    >>> net = ts.UNet(in_channels=1, num_classes=2, base_channels=4, depth=2)
    >>> labels = ts.segment(np.random.rand(100, 80), net, tile_size=32, progress=False)
    >>> labels.shape, labels.dtype
    ((100, 80), dtype('uint8'))
    """
    job = prepare(
        image, model, output, tile_size=tile_size, batch_size=batch_size,
        device=device, client=client, mode=mode,
        padding=padding, level=level, axes=axes, chunk_size=chunk_size, overwrite=overwrite,
        precision=precision, compile=compile, memory_budget=memory_budget, mpp=mpp, series=series,
        channels=channels, tissue_mask=tissue_mask, resume=resume, on_error=on_error, ngff=ngff,
        storage_options=storage_options, instances=instances,
    )
    with job:
        return job.run(progress, client=client, cancel=cancel)[0]




def _within_image(tile_size: Any, shape: tuple[int, ...], geometry: Geometry) -> Any:
    """`tile_size` with each network axis no larger than the image rounded up to the step.

    A larger tile writes the same pixels (the result does not depend on the
    tile size) but computes a network input that large. Sizes that are not
    multiples of the step are left for the plan to refuse.

    Examples
    --------
    >>> _within_image(512, (100, 2000), Geometry(halo=4, step=16))
    (112, 512)
    >>> _within_image((4, 256, 256), (3, 40, 300), Geometry(halo=4, step=8))  # a stack axis first
    (4, 40, 256)
    """
    ndim = geometry.ndim
    tile = (int(tile_size),) * ndim if isinstance(tile_size, (int, np.integer)) else tuple(int(t) for t in tile_size)
    if len(tile) < ndim:
        return tile_size
    lead, own = tile[: len(tile) - ndim], tile[len(tile) - ndim:]
    capped = tuple(min(t, -(-n // s) * s) if t % s == 0 else t
                   for t, n, s in zip(own, shape[len(shape) - ndim:], geometry.step))
    return lead + capped


def _check_tile_fits(model, device: torch.device, channels: int, plan, budget: Optional[int]) -> None:
    """Refuse a tile whose activations cannot fit: most of RAM on CPU, the budget on GPU."""
    from .executor import estimate_bytes_per_tile

    if budget is None:
        budget = default_budget(device, "limit")
    need = estimate_bytes_per_tile(model, channels, plan.input_size)
    # The estimate sums every layer's output, an upper bound some 2-4x the real peak.
    if need / 4 > budget:
        raise UsageError(
            f"tile_size {compact(plan.tile_size)} needs about {need / 4 / 1e9:.1f} GB for one tile's "
            f"activations, more than the {budget / 1e9:.1f} GB available on {device}; use a smaller "
            f"tile_size (e.g. {'512' if plan.geometry.ndim == 2 else '(32, 128, 128)'})"
        )



def _check_channels(model, tiler: Tiler) -> None:
    expected = model.in_channels
    got = tiler.source.channels
    if expected is not None and expected != got:
        raise ModelError(
            f"model expects {expected} input channel(s) but {tiler.source.name} has {got} "
            f"(axes {tiler.source.axes}); use a model for this image, pass channels= to pick "
            "channels, or axes= to say which axis holds them"
        )
