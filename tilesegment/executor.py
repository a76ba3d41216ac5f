"""The executor stage: run the network on batches of tile inputs, on a device."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch import nn

from .errors import UsageError

__all__ = ["Executor", "resolve_device"]

DeviceLike = Union[str, torch.device]


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


class Executor:
    """Run `model` on float32 batches and return float32 logits on the host.

    Parameters
    ----------
    model : torch.nn.Module
        The network, put in eval mode on `device`.
    device : str or torch.device
        ``"auto"`` picks CUDA when available.
    """

    def __init__(self, model: nn.Module, device: DeviceLike = "auto") -> None:
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)

    def __call__(self, data: np.ndarray) -> np.ndarray:
        """Network output of a ``(N, C, h, w)`` batch as a float32 numpy array."""
        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            x = torch.from_numpy(data)
            x = x.pin_memory().to(self.device, non_blocking=True) if cuda else x
            y = self.model(x)
            if isinstance(y, (tuple, list)):
                y = y[0]
            return y.float().cpu().numpy()
