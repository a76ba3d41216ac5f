"""The executor stage: run the network on batches of tile inputs, on a device.

It knows devices, precisions and memory, and nothing about files. On CUDA,
inputs go through pinned host memory on their own stream, the output is
cropped and reduced (argmax / softmax / uint8) on the device, and the small
result comes back with a non-blocking copy that the consumer waits for only
when it needs the numbers. On CPU the raw logits come back and the stitcher's
numba kernels crop and reduce them in one pass.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ._probe import ScriptedPart, main_output, trace
from .errors import TileSegmentError, UsageError
from .geometry import Geometry, Shape
from .models.base import ModelBase, describe, moved
from .modes import Mode, get_mode
from .options import COMPILE_MODES
from .process import tf32_enabled

__all__ = [
    "Executor",
    "InFlight",
    "PRECISIONS",
    "auto_batch_size",
    "default_budget",
    "estimate_bytes_per_tile",
    "reduce_logits",
    "resolve_device",
    "resolve_devices",
]

DeviceLike = Union[str, torch.device]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a usable `torch.device`.

    Raises
    ------
    UsageError
        For an unknown name, or CUDA requested where there is none.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"device {device!r} is unknown; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) found"
            )
    elif dev.type not in ("cpu", "mps"):
        raise UsageError(f"device {device!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    return dev


def resolve_devices(device: Union[DeviceLike, Sequence[DeviceLike]] = "auto") -> list[torch.device]:
    """Devices to run on: ``"cuda"`` means every CUDA device, a list means those.

    Examples
    --------
    >>> resolve_devices("cpu")
    [device(type='cpu')]
    """
    if isinstance(device, (list, tuple)):
        if not device:
            raise UsageError("device list is empty; pass e.g. ['cuda:0', 'cuda:1']")
        return [resolve_device(d) for d in device]
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and str(device) in ("cuda", "auto"):
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [dev]


def default_precision(device: torch.device) -> str:
    """The precision ``"auto"`` means on `device`: bf16 on GPUs of compute capability 8.0
    and later (Ampere, Hopper), fp16 on older GPUs, fp32 elsewhere.

    The capability of `device` itself decides, not that of the current device:
    ``torch.cuda.is_bf16_supported()`` asks the current one, and by default
    counts bf16 emulated in fp32 arithmetic (a T4 or V100) as supported.

    Examples
    --------
    >>> default_precision(torch.device("cpu"))
    'fp32'
    """
    if device.type != "cuda":
        return "fp32"
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16"


def device_scope(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` the current CUDA device of the calling thread for a block (nothing elsewhere).

    Each executor runs in its own thread, whose current device is GPU 0
    until set: whatever a model allocates on "the current device" (``torch.empty(...,
    device="cuda")``, a custom kernel's stream) must land on the executor's own GPU.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class InFlight:
    """A batch result that may still be in flight from the device.

    `numpy()` waits for the device-to-host copy (and nothing else) and returns
    the array. ``reduced`` says whether the executor already cropped and
    reduced it (CUDA) or it holds raw network outputs (CPU).
    """

    def __init__(self, array: torch.Tensor, reduced: bool, event: Optional[torch.cuda.Event] = None,
                 finite: Optional[torch.Tensor] = None) -> None:
        self._array = array
        self._event = event
        self._finite = finite
        self.reduced = reduced

    def numpy(self) -> np.ndarray:
        """The result, once the copy from the device has arrived."""
        if self._event is not None:
            self._event.synchronize()  # a blocking event: the thread sleeps, no core spins
        return self._array.numpy()

    @property
    def nonfinite(self) -> Optional[np.ndarray]:
        """Per tile, whether the network output had NaN/Inf (reduced outputs only; call
        after `numpy`). Raw outputs are checked by the stitcher."""
        return None if self._finite is None else ~self._finite.numpy()


class _Parts(InFlight):
    """The results of a batch that ran in parts (split to fit), all still in flight:
    the device works through the parts while the executor takes the next batch."""

    def __init__(self, parts: list[InFlight]) -> None:
        self._parts = parts
        self.reduced = parts[0].reduced

    def numpy(self) -> np.ndarray:
        return np.concatenate([p.numpy() for p in self._parts])

    @property
    def nonfinite(self) -> Optional[np.ndarray]:
        flags = [p.nonfinite for p in self._parts]
        return None if flags[0] is None else np.concatenate(flags)


@dataclass(frozen=True)
class _Reduce:
    mode: str
    crop: Shape
    tile: Shape



def _compiled(model: nn.Module, compile: Union[bool, str]) -> nn.Module:
    """`model` through ``torch.compile`` as `compile` asks (False: as it is)."""
    if compile is False or compile is None:
        return model
    if compile is True:
        return torch.compile(model)
    if compile not in COMPILE_MODES:
        raise UsageError(f"compile {compile!r} is unknown; use True or one of {', '.join(COMPILE_MODES)}")
    return torch.compile(model, mode=compile)

class Executor:
    """Run `model` on batches of tile inputs on one device.

    Parameters
    ----------
    model : torch.nn.Module
        The network; the executor runs its own copy on `device` (the model's
        ``replicate``, see `tilesegment.models.describe`), in eval mode and
        channels-last, so the caller's module stays where it is, unchanged.
    device : str or torch.device
        ``"auto"`` picks CUDA when available.
    precision : {"auto", "fp32", "bf16", "fp16"}
        Autocast precision; "auto" is bf16 on GPUs that support it, fp32 on CPU.
    mode : {"labels", "probabilities", "logits"}, optional
        With `geometry` and `tile_size`, lets a CUDA executor crop and reduce
        on the device so only the small result is copied back.
    geometry, tile_size
        Where a tile's pixels sit in the network output (see above).
    channels_last : bool, optional
        NHWC memory format (default: on; faster with cuDNN and with oneDNN on CPU).
    compile : bool or str
        Wrap the model in ``torch.compile``; a string is its ``mode``:
        ``"reduce-overhead"`` replays CUDA graphs, one launch per batch
        instead of one per kernel, so launches do not compete for the GIL
        with the reader and writer threads. Batches are padded to one size,
        so each graph is captured once.
    max_batch : int, optional
        Largest batch to run at once; larger batches are split. Halved
        automatically on out-of-memory errors.
    memory_budget : int, optional
        Bytes the executor may use for activations (default on CUDA:
        `default_budget`, 70 % of the free memory); batches whose measured or estimated need exceeds it
        are split as if the device ran out of memory.
    reduce_on_device : bool, optional
        Crop and reduce on the device (default: on CUDA only; on CPU the
        stitcher's single-pass kernels are cheaper).
    input_affine : (scale, offset), optional
        Per-channel ``input = pixel * scale + offset`` applied on the device to
        batches that arrive unnormalized in their source dtype (uint8 slides:
        a quarter of the host work and bus traffic of float32); float32
        batches then must be unnormalized too.
    """

    def __init__(
        self,
        model: nn.Module,
        device: DeviceLike = "auto",
        *,
        precision: str = "auto",
        mode: Optional[str] = None,
        geometry: Optional[Geometry] = None,
        tile_size: Optional[Shape] = None,
        channels_last: Optional[bool] = None,
        compile: Union[bool, str] = False,
        max_batch: Optional[int] = None,
        memory_budget: Optional[int] = None,
        reduce_on_device: Optional[bool] = None,
        input_affine: Optional[tuple[np.ndarray, np.ndarray]] = None,
    ) -> None:
        self.device = resolve_device(device)
        if precision not in PRECISIONS:
            raise UsageError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
        self.precision = default_precision(self.device) if precision == "auto" else precision
        cuda = self.device.type == "cuda"
        # NHWC: cuDNN prefers it, and oneDNN on CPU runs this U-Net about 2x faster
        # (0.055 vs 0.108 s for a 700^2 tile, base 8; docs/benchmarks.md); NDHWC for
        # 3-d networks (0.55 vs 0.66 s for a 40 x 168^2 input, base 8, depth 2).
        self.channels_last = True if channels_last is None else channels_last
        model = describe(model).replicate(self.device)
        if self.channels_last:
            _to_channels_last(model)
        self.model = _compiled(model, compile)
        # A compiled model recompiles for every new batch size: smaller batches (the
        # last one, the parts of a split) are padded to the largest that ran.
        self._pad_to: Optional[int] = 0 if compile else None
        on_device = cuda if reduce_on_device is None else reduce_on_device
        self._reduce = (
            _Reduce(mode, geometry.crop, tuple(tile_size))
            if on_device and mode is not None and geometry is not None and tile_size is not None
            else None
        )
        self.max_batch = max_batch
        if memory_budget is None and cuda:
            memory_budget = default_budget(self.device, "plan")
        self.memory_budget = memory_budget
        # A meta-device upper bound until the first CUDA batch measures the real peak (when
        # the model allocates through torch: onnxruntime's arena is invisible to it).
        self.bytes_per_tile: Optional[float] = None
        self._measure = cuda and getattr(model, "torch_memory", True)  # optional in the contract
        if memory_budget is not None and geometry is not None and tile_size is not None:
            self.bytes_per_tile = estimate_bytes_per_tile(model, model.in_channels or 1,
                                                          geometry.input_size(tile_size))
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._uploaded = torch.cuda.Event(blocking=True) if cuda else None
        self._affine = None
        if input_affine is not None:
            scale, offset = (torch.as_tensor(np.asarray(v, np.float32), device=self.device)
                             for v in input_affine)
            self._affine = (scale, offset)

    @property
    def takes_raw(self) -> bool:
        """Whether batches arrive unnormalized, in the image's dtype (`input_affine`)."""
        return self._affine is not None

    # -- memory ----------------------------------------------------------------------

    def host_buffer(self, shape: tuple[int, ...], dtype: np.dtype = np.float32) -> np.ndarray:
        """A host array to gather a batch into: pinned on CUDA, for asynchronous copies.

        torch's caching host allocator hands the pinned blocks of finished
        batches out again, so pinning costs once per buffer size, not per batch.
        """
        if self.device.type == "cuda":
            dt = torch.from_numpy(np.empty(0, dtype)).dtype
            return torch.empty(shape, dtype=dt, pin_memory=True).numpy()
        return np.empty(shape, dtype=dtype)

    def _fits(self, n: int) -> bool:
        if self.max_batch is not None and n > self.max_batch:
            return False
        if self.memory_budget is not None and self.bytes_per_tile is not None:
            return n * self.bytes_per_tile <= self.memory_budget
        return True

    # -- running ---------------------------------------------------------------------

    def __call__(self, data: np.ndarray) -> InFlight:
        """Start the network on a ``(N, C, *input_size)`` batch (``(N, C, h, w)``, or
        ``(N, C, d, h, w)`` for volumes); return its `InFlight` result.

        Batches larger than the executor may run at once are split; on an
        out-of-memory error the limit is halved and the batch retried, so no
        tile is lost. A single tile that does not fit is an error.
        """
        n = len(data)
        if n == 0:
            raise UsageError("empty batch")
        if not self._fits(n) and n > 1:
            return self._split(data)
        try:
            return self._run(data)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not _is_out_of_memory(exc):
                raise
        # Retry outside the except block: its traceback would keep the failed
        # attempt's activations alive while the halves run.
        if n == 1:
            raise TileSegmentError(
                f"one tile of input {tuple(data.shape[2:])} does not fit in memory on {self.device}; "
                "use a smaller tile_size"
            )
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.max_batch = max(1, n // 2)
        return self._split(data)

    def _split(self, data: np.ndarray) -> InFlight:
        limit = max(1, min(len(data) // 2 if self.max_batch is None else self.max_batch, len(data) - 1))
        return _Parts([self(data[i : i + limit]) for i in range(0, len(data), limit)])

    def _run(self, data: np.ndarray) -> InFlight:
        n = len(data)
        with torch.inference_mode(), device_scope(self.device):
            x = self._padded(self._to_device(torch.from_numpy(data)))
            measure = self._measure
            if measure:
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
            with self.precision_context():
                y = main_output(self.model(x))[:n]
            if measure:
                peak = torch.cuda.max_memory_allocated(self.device) - before
                self.bytes_per_tile, self._measure = peak / len(x), False
            if self._pad_to is not None:
                self._pad_to = max(self._pad_to, len(x))
            if self._reduce is not None:
                return self._reduced_to_host(y)
            return InFlight(y.float().cpu(), reduced=False)

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """`x` with copies of its first tile appended up to the batch size the compiled model
        knows (`compile` only); the padding's outputs are dropped."""
        if self._pad_to is None:
            return x
        target = self._pad_to if self.max_batch is None else min(self._pad_to, self.max_batch)
        if len(x) >= target:
            return x
        return self._layout(torch.cat((x, x[:1].expand(target - len(x), *x.shape[1:]))))

    def precision_context(self) -> contextlib.AbstractContextManager:
        """Autocast for bf16/fp16. fp32 on CUDA must be true fp32: with TF32 on (PyTorch's
        default for convolutions) it is refused, and `tilesegment.exact_fp32` is the fix."""
        if self.precision != "fp32":
            return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])
        if self.device.type == "cuda" and tf32_enabled():
            raise UsageError(
                f"precision fp32 on {self.device} would run convolutions in TF32 (on in this process, "
                "PyTorch's default), which is not exact; run inside 'with tilesegment.exact_fp32():' "
                "(TF32 off for the block, your settings restored after) or use precision='bf16'")
        return contextlib.nullcontext()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_last:
            return x.contiguous()
        if x.ndim in (4, 5):
            return x.contiguous(memory_format=memory_format(x.ndim))
        # Higher ranks (a volume network over T) have no torch format; batches arrive
        # channels-last from the Tiler and PlaneWise's reshape keeps that layout.
        return x

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self._copy_stream is None:
            x = self._normalize(x)
            return self._layout(x) if self.channels_last else x
        if not x.is_pinned():
            x = x.pin_memory()
        # The upload runs on its own stream so it overlaps the previous batch's compute
        # (already queued on the compute stream). Waiting for it here, not for the
        # compute, lets the host buffer be recycled safely as soon as we return.
        with torch.cuda.stream(self._copy_stream):
            x_dev = x.to(self.device, non_blocking=True)
        self._uploaded.record(self._copy_stream)
        self._uploaded.synchronize()  # blocking: the thread sleeps until the upload is done
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self._copy_stream)
        x_dev.record_stream(compute)
        return self._layout(self._normalize(x_dev))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Source pixels -> float32 network input, where the batch came unnormalized."""
        if self._affine is None:
            return x
        shape = (1, -1) + (1,) * (x.ndim - 2)
        scale, offset = (v.view(shape) for v in self._affine)
        # One rounding, as the host's `tilesegment.io.mirror.gather_nd`: the two agree bit for bit.
        return torch.addcmul(offset, x.to(torch.float32), scale)

    def _reduced_to_host(self, y: torch.Tensor) -> InFlight:
        r = self._reduce
        y = y[(slice(None), slice(None), *(slice(c, c + t) for c, t in zip(r.crop, r.tile)))].float()
        finite = torch.isfinite(y).flatten(1).all(1)  # reduction would hide NaN/Inf
        y = reduce_logits(y, r.mode)
        if self.device.type != "cuda":
            return InFlight(y.cpu(), reduced=True, finite=finite.cpu())
        host = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
        host.copy_(y, non_blocking=True)
        host_finite = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
        host_finite.copy_(finite, non_blocking=True)
        event = torch.cuda.Event(blocking=True)
        event.record(torch.cuda.current_stream(self.device))
        return InFlight(host, reduced=True, event=event, finite=host_finite)


#: What a plain RuntimeError says when the device ran out of memory: TorchScript's CUDA
#: out-of-memory, and cuDNN or cuBLAS failing to allocate their workspace.
_OUT_OF_MEMORY = ("out of memory", "cudnn_status_alloc_failed", "cublas_status_alloc_failed")


def _is_out_of_memory(exc: BaseException) -> bool:
    message = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or any(m in message for m in _OUT_OF_MEMORY)


def reduce_logits(y: torch.Tensor, mode: Union[str, Mode]) -> torch.Tensor:
    """Turn ``(N, K, *spatial)`` logits into what `mode` writes, as the stitcher's kernels do
    (see `tilesegment.modes`)."""
    return get_mode(mode).reduce(y)


def memory_format(rank: int) -> torch.memory_format:
    """Channels-last for tensors of `rank` (NHWC, NDHWC), contiguous for others."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(rank, torch.contiguous_format)


def _to_channels_last(model: nn.Module) -> None:
    """Convert the weights of `model` (an executor's own copy) to channels-last, in place."""
    # The convolutions' rank decides (a 2-d network run over a stack has 4-d weights
    # but 5-d inputs); torch converts only the weights of that rank.
    rank = next((p.ndim for p in model.parameters() if p.ndim >= 4), 4)
    moved(model, memory_format=memory_format(rank))


def default_budget(device: torch.device, purpose: str = "plan") -> int:
    """Bytes of memory a run may count on for activations on `device`, by `purpose`.

    The activation estimates (`estimate_bytes_per_tile`) sum every layer's
    output: an upper bound, some 2-4x the real peak. The ratios:

    - ``"plan"`` (batch size, tile size, splitting batches before they run):
      on CUDA 70 % of the free memory (counting blocks torch's allocator
      caches but no tensor uses); the rest is for cuDNN's workspaces,
      the caching allocator's fragmentation and the reduced outputs in
      flight. On CPU a quarter of the RAM, at most 8 GiB: the host also
      holds the prefetched batches, the chunk buffers being written and
      other processes (only volumes' tile sizes ask; CPU batches are 1).
    - ``"limit"`` (refuse a tile that cannot fit at all): on CUDA 90 % of
      the free memory, on CPU 80 % of the RAM; what is there, less a margin.

    Parameters
    ----------
    device : torch.device
    purpose : {"plan", "limit"}

    Returns
    -------
    int
        Bytes.
    """
    if purpose not in ("plan", "limit"):
        raise ValueError(f"memory budget purpose {purpose!r} is unknown; use 'plan' or 'limit'")
    if device.type == "cuda":
        # Blocks torch's allocator holds but no tensor uses are free to this run too; without
        # them a previous run's cache would shrink the next run's tiles (a folder of slides).
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        free = torch.cuda.mem_get_info(device)[0] + cached
        return int(free * (0.7 if purpose == "plan" else 0.9))
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(8 << 30, ram // 4) if purpose == "plan" else int(ram * 0.8)


def estimate_bytes_per_tile(model: nn.Module, in_channels: int, input_size: Shape, analytic: bool = True) -> int:
    """Upper bound on activation bytes of one tile: the sum of all layer outputs.

    Models that know it in closed form (``activation_bytes``, as `UNet`
    does) are asked (unless `analytic` is False); others are traced once on
    the meta device (`tilesegment._probe.trace`). A TorchScript part, whose
    layers cannot be seen, counts as 64 float maps of its input.
    """
    if analytic and isinstance(model, ModelBase):
        known = model.activation_bytes(tuple(input_size))
        if known is not None:
            return int(known)
    total = 0

    def count(layer: nn.Module, inputs: tuple, output) -> None:
        nonlocal total
        if isinstance(layer, ScriptedPart):
            total += 64 * inputs[0].numel() * 4
        elif isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    trace(model, (1, in_channels, *input_size), count)
    return total


def auto_batch_size(
    model: nn.Module, device: torch.device, in_channels: int, input_size: Shape, budget: Optional[int] = None
) -> int:
    """Tiles per batch: 1 on CPU (fastest there); on CUDA what fits the memory budget.

    The budget defaults to `default_budget` (70 % of the device's free
    memory); the per-tile need comes from a meta-device trace (an upper
    bound) and is refined by the executor's measured peak on the first batch.
    """
    if device.type != "cuda":
        return 1
    if budget is None:
        budget = default_budget(device, "plan")
    per_tile = max(1, estimate_bytes_per_tile(model, in_channels, input_size))
    return int(max(1, min(64, math.floor(budget / per_tile))))
