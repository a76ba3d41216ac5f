"""Process-wide switches: changed only by the CLI, or by a context manager the caller enters.

A library call must not change the process it runs in behind its caller's
back: a napari session or a training script shares it. The two settings a
run may want that are process-wide live here, and nothing in the engine
turns them on by itself:

- `exact_fp32`: TF32 off for CUDA convolutions and matmuls, so that
  ``precision="fp32"`` on a GPU is exact. An fp32 run on CUDA with TF32 on
  is refused with a message that names this context manager.
- `cudnn_autotune`: cuDNN times the convolution algorithms for each new
  input shape once and keeps the fastest (``torch.backends.cudnn.benchmark``);
  a run has a handful of shapes and thousands of batches of each.
- `return_large_buffers`: glibc returns freed buffers of 1 MiB and more to
  the system at once (volume runs; see `tilesegment._heap`).

The ``tilesegment`` command owns its process and turns them all on.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import torch

from ._heap import return_large_buffers

__all__ = ["exact_fp32", "cudnn_autotune", "tf32_enabled", "return_large_buffers"]


class _Shared:
    """A process-wide setting that blocks in any thread may hold: `switch` (which returns
    what it replaced) runs when the first block enters, `restore` when the last one leaves."""

    def __init__(self, switch: Callable[[], Any], restore: Callable[[Any], None]) -> None:
        self._switch, self._restore = switch, restore
        self._lock = threading.Lock()
        self._users = 0
        self._saved: Any = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = self._switch()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._restore(self._saved)


def _new_api() -> bool:
    """torch >= 2.9 sets TF32 per backend and operator (``fp32_precision``); mixing it with
    the legacy ``allow_tf32`` flags raises, so the new one is used wherever it exists."""
    return hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision")


def _effective(*levels: str) -> str:
    """An ``fp32_precision`` chain, most specific first: "none" defers to the next level."""
    return next((p for p in levels if p != "none"), "ieee")


def tf32_enabled() -> bool:
    """Whether CUDA convolutions or matmuls in fp32 may run in TF32 in this process now.

    Examples
    --------
    >>> with exact_fp32():
    ...     tf32_enabled()
    False
    """
    b = torch.backends
    if _new_api():
        top, cudnn = b.fp32_precision, b.cudnn.fp32_precision
        conv = _effective(b.cudnn.conv.fp32_precision, cudnn, top)
        matmul = _effective(b.cuda.matmul.fp32_precision, top)
        return "tf32" in (conv, matmul)
    return bool(b.cudnn.allow_tf32 or b.cuda.matmul.allow_tf32)


def _save_and_switch_off() -> tuple:
    b = torch.backends
    if _new_api():
        saved = (b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision)
        b.cudnn.conv.fp32_precision = b.cuda.matmul.fp32_precision = "ieee"
    else:
        saved = (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32)
        b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = False
    return saved


def _restore(saved: tuple) -> None:
    b = torch.backends
    if _new_api():
        b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision = saved
    else:
        b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = saved


_TF32_OFF = _Shared(_save_and_switch_off, _restore)


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Run the block with TF32 off for CUDA convolutions and matmuls; restore the settings after.

    TF32 (PyTorch's default for cuDNN convolutions on Ampere and later)
    costs about 1e-3 relative error, and with it exactness; inside this
    block ``precision="fp32"`` means true fp32. The switches are
    process-wide: other threads see them too while the block runs. Blocks
    may nest and overlap across threads; the settings come back when the
    last one ends. cuDNN reads them when a kernel is chosen, on the host, so
    kernels already queued are unaffected.

    Examples
    --------
    >>> import tilesegment as ts
    >>> with ts.exact_fp32():
    ...     pass  # ts.segment(image, net, device="cuda", precision="fp32")
    """
    with _TF32_OFF.held():
        yield


def _autotune_on() -> bool:
    saved, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
    return saved


def _set_autotune(value: bool) -> None:
    torch.backends.cudnn.benchmark = value


_AUTOTUNE = _Shared(_autotune_on, _set_autotune)


@contextlib.contextmanager
def cudnn_autotune() -> Iterator[None]:
    """Run the block with cuDNN autotuning on (``torch.backends.cudnn.benchmark``); restore it after.

    cuDNN then times its convolution algorithms the first time it meets an
    input shape, and keeps the fastest for that shape. A run has a few shapes
    (the batch, the last batch, the halves of a split) and meets each
    thousands of times, so the first batches pay a few seconds for a faster
    rest. Process-wide and nestable across threads, as `exact_fp32`; the
    ``tilesegment`` command enters it.

    Examples
    --------
    >>> import tilesegment as ts
    >>> with ts.cudnn_autotune():
    ...     torch.backends.cudnn.benchmark
    True
    """
    with _AUTOTUNE.held():
        yield
