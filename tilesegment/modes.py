"""Output modes: what is written per pixel, one small object per mode.

A mode carries everything the other stages need to know about it: the dtype
and shape of the output, the numba kernel that crops and reduces a network
output on the host, its torch twin that does the same on a device, the
background it fills skipped tiles with, whether the result is a label image
(nearest-neighbour pyramid, NGFF image-label metadata), and how well it
compresses. Adding a mode is one class and its registration
(`tilesegment.registry.modes`, or a ``tilesegment.modes`` entry point), and its test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

import numpy as np

from .errors import UsageError
from .registry import modes

if TYPE_CHECKING:
    import torch

__all__ = ["Mode", "Labels", "Probabilities", "Logits", "get_mode", "mode_names"]


@dataclass(frozen=True)
class Mode:
    """Base of the output modes; see `Labels`, `Probabilities` and `Logits`."""

    name: str
    dtype: np.dtype
    #: Whether the output has a class axis first: ``(K, *spatial)``, else ``spatial``.
    per_class: bool
    #: Expected compressed bytes per raw byte (zstd + bit-shuffle); only used to refuse
    #: runs that cannot fit the disk.
    compression: float

    @property
    def kernel(self) -> Callable:
        """``kernel(out, cy, cx, h, w, dest, dy, dx) -> all finite``: crop and reduce on the host."""
        raise NotImplementedError

    def reduce(self, logits: "torch.Tensor") -> "torch.Tensor":
        """The kernel's reduction on ``(N, K, ...)`` logits already cropped, on any device."""
        raise NotImplementedError

    def fill(self, window: np.ndarray) -> None:
        """Write background into `window` (a skipped or unreadable tile)."""
        window[...] = 0

    def shape(self, spatial: tuple[int, ...], num_classes: int) -> tuple[int, ...]:
        """Output array shape for an image of `spatial` shape."""
        return (num_classes, *spatial) if self.per_class else tuple(spatial)

    def bytes_per_pixel(self, num_classes: int) -> int:
        return np.dtype(self.dtype).itemsize * (num_classes if self.per_class else 1)

    def label_count(self, num_classes: int) -> Optional[int]:
        """Number of label values for image-label metadata, or None if the output is not labels."""
        return None

    def check_classes(self, num_classes: int) -> None:
        """Refuse a class count the mode cannot write."""

    def __str__(self) -> str:
        return self.name


class Labels(Mode):
    """``(Y, X)`` uint8 argmax of the classes (``logit > 0`` for one class)."""

    def __init__(self) -> None:
        super().__init__("labels", np.dtype(np.uint8), per_class=False, compression=0.15)

    @property
    def kernel(self) -> Callable:
        from ._kernels import crop_labels

        return crop_labels

    def reduce(self, logits):
        import torch

        labels = (logits > 0) if logits.shape[1] == 1 else logits.argmax(1, keepdim=True)
        return labels.to(torch.uint8)

    def label_count(self, num_classes: int) -> Optional[int]:
        return max(num_classes, 2)

    def check_classes(self, num_classes: int) -> None:
        if num_classes > 256:
            raise UsageError(f"{num_classes} classes do not fit uint8 labels; use mode='logits'")


class Probabilities(Mode):
    """``(K, Y, X)`` uint8 ``round(softmax * 255)`` (sigmoid for one class)."""

    def __init__(self) -> None:
        super().__init__("probabilities", np.dtype(np.uint8), per_class=True, compression=0.5)

    @property
    def kernel(self) -> Callable:
        from ._kernels import crop_probabilities

        return crop_probabilities

    def reduce(self, logits):
        import torch

        p = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
        return torch.floor(p * 255.0 + 0.5).to(torch.uint8)

    def fill(self, window: np.ndarray) -> None:
        window[...] = 0
        window[0] = 255  # certainly background


class Logits(Mode):
    """``(K, Y, X)`` float32 network outputs, unchanged."""

    def __init__(self) -> None:
        super().__init__("logits", np.dtype(np.float32), per_class=True, compression=1.0)

    @property
    def kernel(self) -> Callable:
        from ._kernels import crop_copy

        return crop_copy

    def reduce(self, logits):
        return logits


for _mode in (Labels(), Probabilities(), Logits()):  # in the order the CLI lists them
    modes.register(_mode.name, _mode)


def mode_names() -> list[str]:
    """Every mode's name: ours, then those other packages register (`tilesegment.registry`)."""
    return modes.names()


def get_mode(mode: Union[str, Mode]) -> Mode:
    """The `Mode` named `mode` (a mode passes through).

    Raises
    ------
    UsageError
        For an unknown name, listing the known ones.
    """
    if isinstance(mode, Mode):
        return mode
    if isinstance(mode, str) and mode in modes:
        return modes.get(mode)
    raise UsageError(f"mode {mode!r} is unknown; use one of {', '.join(modes.names())}")
