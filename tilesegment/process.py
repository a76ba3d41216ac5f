"""Process-wide switches: changed only by the CLI, or by a context manager the caller enters.

A library call must not change the process it runs in behind its caller's
back: a napari session or a training script shares it. The two settings a
run may want that are process-wide live here, and nothing in the engine
turns them on by itself:

- `exact_fp32`: TF32 off for CUDA convolutions and matmuls, so that
  ``precision="fp32"`` on a GPU is exact. An fp32 run on CUDA with TF32 on
  is refused with a message that names this context manager.
- `return_large_buffers`: glibc returns freed buffers of 1 MiB and more to
  the system at once (volume runs; see `tilesegment._heap`).

The ``tilesegment`` command owns its process and turns both on.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from ._heap import return_large_buffers

__all__ = ["exact_fp32", "tf32_enabled", "return_large_buffers"]

_lock = threading.Lock()
_users = 0
_saved: tuple = ()


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
    global _users, _saved
    with _lock:
        if _users == 0:
            _saved = _save_and_switch_off()
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                _restore(_saved)
