"""The settings of a run as plain values: what to read, how to cut it, how to compute, where to write.

`segment()` keeps its flat keywords for users and builds these values from
them; the `Job` holds them, the run record (resume checks) is made from
them, and `Job.spec` sends them, pickled, to the workers of a cluster.

- `tilesegment.io.sources.ReadOptions`: which pixels of the file (level, series, channels, mpp).
- `PlanOptions`: how the image is cut (tile size, output chunk size, padding).
- `ComputeOptions`: how the network runs (devices, precision, batch, compile, memory).
- `DeviceFacts`: what "auto" means on the devices that will run (precision, memory budgets),
  asked once, here or of a cluster's workers, so that the record and every executor agree.
- `tilesegment.io.output.Output`: where the result goes and how existing data is treated.
- `InstanceRecipe`: how a model's objects are made from its classes (seeds, growth), kept in the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from .errors import UsageError
from .geometry import Geometry, Shape
from .io.sources import ReadOptions

#: ``torch.compile`` modes that ``compile=`` takes, besides True (the default mode).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

__all__ = ["COMPILE_MODES", "PlanOptions", "ComputeOptions", "DeviceFacts", "InstanceRecipe", "JobSpec",
           "ReadOptions"]


@dataclass(frozen=True)
class PlanOptions:
    """How the image is cut into tiles and the output into chunks.

    Attributes
    ----------
    tile_size : tuple of int
        Edge of the written tile per plan axis (a multiple of the network step).
    chunk_size : tuple of int
        Output chunk edge per plan axis; divides the tile size or is a multiple of it.
    padding : str
        Pixels outside the image: "reflect", "symmetric", "edge" or "constant".
    """

    tile_size: Shape
    chunk_size: Shape
    padding: str = "reflect"

    def to_dict(self) -> dict:
        """Plain values (JSON-ready), for the run record that resume compares."""
        return {"tile_size": list(self.tile_size), "chunk_size": list(self.chunk_size), "padding": self.padding}


@dataclass(frozen=True)
class ComputeOptions:
    """How the network runs: on which devices, in which precision, how many tiles at once.

    Attributes
    ----------
    devices : tuple of str
        Resolved devices, one executor each (``("cpu",)``, ``("cuda:0", "cuda:1")``).
        A cluster's workers each use their own device instead.
    precision : {"auto", "fp32", "bf16", "fp16"}
        `prepare` resolves "auto" (`DeviceFacts`), so the run record and every
        executor, here or on a cluster's workers, use the same precision.
    batch_size : int
    compile : bool or str
        Run the model through ``torch.compile`` (a string: its mode;
        ``"reduce-overhead"`` replays CUDA graphs).
    memory_budget : int, optional
        Bytes of device memory a batch may use.
    raw_inputs : bool, optional
        Send batches in the image's 1-byte dtype and normalize on the device
        (a quarter of the host work and bus traffic). None: on GPUs, for
        uint8/int8 images. Results are the same either way.
    reduce_on_device : bool, optional
        Crop and reduce (argmax, softmax) on the device, copying back only
        the result. None: on GPUs. Results are the same either way.
    """

    devices: tuple[str, ...] = ("cpu",)
    precision: str = "auto"
    batch_size: int = 1
    compile: Union[bool, str] = False
    memory_budget: Optional[int] = None
    raw_inputs: Optional[bool] = None
    reduce_on_device: Optional[bool] = None


@dataclass(frozen=True)
class InstanceRecipe:
    """How a model's objects are made: the components of `classes` (the seeds), grown by at most
    `grow` pixels into `grow_into` (`tilesegment.label_objects`).

    A checkpoint names it in its metadata (``instances``: ``{"classes": [2], "grow_into": [3],
    "grow": 3}``); `segment` records it in the output (``tilesegment.instances``) and
    `label_objects` uses it when it is given no classes and no growth.
    """

    classes: tuple[int, ...]
    grow: float = 0
    grow_into: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, value: Any, where: str = "the instance recipe") -> "InstanceRecipe":
        """Check a recipe read from metadata or given by a user.

        Raises
        ------
        UsageError
            Naming `where` and what is wrong: no seed classes, a negative growth, growth
            without classes to grow into (or the reverse), keys it does not know.
        """
        if isinstance(value, InstanceRecipe):
            return value
        if not isinstance(value, dict):
            raise UsageError(f"{where} must be a mapping like {{'classes': [2], 'grow_into': [3], 'grow': 3}}, "
                             f"not {value!r}")
        unknown = set(value) - {"classes", "grow", "grow_into"}
        if unknown:
            raise UsageError(f"{where} has unknown keys {sorted(unknown)}; it takes classes, grow and grow_into")

        def numbers(key: str) -> tuple[int, ...]:
            got = value.get(key) or ()
            try:
                out = tuple(int(k) for k in got)
            except (TypeError, ValueError):
                out = (-1,)
            if any(k < 0 for k in out) or isinstance(got, (str, bytes)):
                raise UsageError(f"{where}: {key} {got!r} must be a list of class numbers, e.g. [2]")
            return out

        classes, into = numbers("classes"), numbers("grow_into")
        grow = value.get("grow", 0)
        if not classes:
            raise UsageError(f"{where} names no seed classes; give classes, e.g. [2]")
        if isinstance(grow, bool) or not isinstance(grow, (int, float)) or not grow >= 0:
            raise UsageError(f"{where}: grow {grow!r} must be a distance in pixels >= 0")
        if bool(grow) != bool(into):
            raise UsageError(f"{where}: grow and grow_into go together (grow={grow!r}, grow_into={list(into)})")
        return cls(classes, grow, into)

    def to_dict(self) -> dict:
        """Plain values, as stored in metadata."""
        return {"classes": list(self.classes), "grow_into": list(self.grow_into), "grow": self.grow}

    def describe(self) -> str:
        """One line for the CLI.

        >>> InstanceRecipe((2,), 3, (3,)).describe()
        'seeds class 2, grown by up to 3 px into class 3'
        """
        seeds = f"seeds class{'es' if len(self.classes) > 1 else ''} {','.join(map(str, self.classes))}"
        if not self.grow:
            return seeds
        into = ",".join(map(str, self.grow_into))
        return f"{seeds}, grown by up to {self.grow:g} px into class{'es' if len(self.grow_into) > 1 else ''} {into}"


@dataclass(frozen=True)
class DeviceFacts:
    """What "auto" means on the device that runs the network: its precision and memory budgets.

    `prepare` resolves the automatic precision, tile size and batch size from
    these once, for this machine's devices or, on a cluster, from what each
    worker reports of its own device (`tilesegment.distributed.worker_facts`),
    so that the run record and every executor agree.

    Attributes
    ----------
    device : str
        The device, e.g. ``"cuda:0"`` or ``"cpu"``.
    precision : str
        What ``precision="auto"`` means there (`tilesegment.executor.default_precision`).
    plan_budget, limit_budget : int
        Bytes for activations (`tilesegment.executor.default_budget`): what
        automatic sizes plan for, and the most a single tile may need.
    """

    device: str
    precision: str
    plan_budget: int
    limit_budget: int

    @classmethod
    def of(cls, device: Any, memory_budget: Optional[int] = None) -> "DeviceFacts":
        """The facts of `device` (a `torch.device` or its name) on this machine; a given
        `memory_budget` replaces both budgets."""
        import torch

        from .executor import default_budget, default_precision

        device = torch.device(device)
        if memory_budget is not None:
            plan = limit = int(memory_budget)
        else:
            plan, limit = default_budget(device, "plan"), default_budget(device, "limit")
        return cls(str(device), default_precision(device), plan, limit)

    @staticmethod
    def common(facts: Sequence["DeviceFacts"], precision: str, where: str) -> tuple["DeviceFacts", str]:
        """The device to size automatic tiles and batches for (the one with the least
        memory), and the precision every device runs (`precision` resolved).

        Parameters
        ----------
        facts : sequence of DeviceFacts
            One per device (or per cluster worker).
        precision : str
            As asked; "auto" is resolved to what every device means by it.
        where : str
            Names the devices in the error, e.g. "the devices" or "the cluster's workers".

        Raises
        ------
        UsageError
            If "auto" means different precisions on different devices.

        Examples
        --------
        >>> gpu = DeviceFacts("cuda:0", "bf16", 2 << 30, 3 << 30)
        >>> DeviceFacts.common([gpu, DeviceFacts("cuda:1", "bf16", 1 << 30, 2 << 30)], "auto", "")[0].device
        'cuda:1'
        """
        smallest = min(facts, key=lambda f: f.plan_budget)
        if precision != "auto":
            return smallest, precision
        meant = sorted({f.precision for f in facts})
        if len(meant) > 1:
            counts = ", ".join(f"{p} on {sum(f.precision == p for f in facts)}" for p in meant)
            raise UsageError(f"precision 'auto' means different precisions on {where} ({counts}); "
                             f"choose one with precision= (CLI: --precision), e.g. {meant[0]}")
        return smallest, meant[0]


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to open a `Job`'s image and compute its blocks: plain,
    picklable values (the model travels separately, scattered to each worker once).

    `open` rebuilds the job on the worker; `tilesegment.runner.run_blocks`
    then runs it exactly as a local run would.
    """

    image: str
    read: ReadOptions
    storage_options: Optional[dict]
    network_ndim: int  # spatial axes of the network itself: how the image is opened
    axes: str  # the plan's axes, as the client opened the image
    geometry: Geometry
    plan: PlanOptions
    compute: ComputeOptions
    mode: str
    num_classes: int
    on_error: str
    tissue: Optional[np.ndarray]  # per tile: computed (True) or filled as background; None: all

    def open(self, model: Any):
        """The `Job` of this spec on this machine, with its own open image.

        Raises
        ------
        UsageError
            If the image here does not have the axes the client saw (another file).
        """
        from .api import Job
        from .errors import UsageError
        from .tiler import Tiler

        source = self.read.open(self.image, self.storage_options, ndim=self.network_ndim)
        if source.plan_axes.lower() != self.axes:
            source.close()
            raise UsageError(f"{self.image} has axes {source.plan_axes} on this worker but "
                             f"{self.axes.upper()} on the client; is it the same file?")
        tiler = Tiler(source, self.geometry, self.plan.tile_size, chunk_size=self.plan.chunk_size,
                      padding=self.plan.padding, normalization=model.normalization,
                      on_error=self.on_error)
        return Job(model=model, tiler=tiler, mode=self.mode, compute=self.compute, tissue=self.tissue,
                   image_path=self.image, read=self.read, num_classes=self.num_classes,
                   storage_options=self.storage_options)
