"""The valid-convolution U-Net of Ronneberger et al. (2015), configurable."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ModelError
from ..geometry import Geometry

__all__ = ["UNet"]


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    # Two 3x3 *valid* convolutions: no zero padding anywhere in the network.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3),
        nn.ReLU(inplace=True),
    )


def _centre_crop(skip: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    dy = (skip.shape[-2] - like.shape[-2]) // 2
    dx = (skip.shape[-1] - like.shape[-1]) // 2
    return skip[..., dy : dy + like.shape[-2], dx : dx + like.shape[-1]]


class UNet(nn.Module):
    """U-Net with valid convolutions, as in the paper.

    Each level has two 3x3 valid convolutions with ReLU; the contracting path
    halves the size with 2x2 max-pooling, the expanding path doubles it with a
    2x2 up-convolution and concatenates the centre-cropped skip connection; a
    1x1 convolution maps to class logits. The default configuration is the
    paper's: a 572x572 input gives a 388x388 output.

    Parameters
    ----------
    in_channels : int
        Image channels (3 for RGB).
    num_classes : int
        Output channels (class logits).
    base_channels : int
        Feature maps at the first level; doubled at each level below.
    depth : int
        Number of pooling steps (4 in the paper). The network's step is
        ``2**depth`` and its halo ``6 * 2**depth - 4``.
    normalization : (sequence of float, sequence of float), optional
        Per-channel ``(mean, std)`` applied by the loader after scaling
        integers to [0, 1]; stored in checkpoints.

    Examples
    --------
    >>> import torch, tilesegment as ts
    >>> net = ts.UNet(in_channels=1, num_classes=2, base_channels=4, depth=2)
    >>> net(torch.zeros(1, 1, 60, 60)).shape
    torch.Size([1, 2, 20, 20])
    """

    __jit_unused_properties__ = ["geometry"]  # lets torch.jit.script export the network

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_channels: int = 64,
        depth: int = 4,
        normalization: Optional[tuple[Sequence[float], Sequence[float]]] = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or base_channels < 1 or depth < 0:
            raise ModelError(
                f"UNet needs in_channels, num_classes, base_channels >= 1 and depth >= 0; got "
                f"{in_channels}, {num_classes}, {base_channels}, {depth}"
            )
        self.config = dict(
            in_channels=int(in_channels),
            num_classes=int(num_classes),
            base_channels=int(base_channels),
            depth=int(depth),
        )
        self.normalization = _check_normalization(normalization, in_channels)
        widths = [base_channels * 2**d for d in range(depth + 1)]
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths[:-1]:
            self.down.append(_double_conv(c, w))
            c = w
        self.bottom = _double_conv(c, widths[-1])
        self.up = nn.ModuleList()
        self.decode = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(2 * w, w, 2, stride=2))
            self.decode.append(_double_conv(2 * w, w))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.pool = nn.MaxPool2d(2)

    @property
    def geometry(self) -> Geometry:
        """Analytic geometry: every level loses 2 pixels per side at its scale."""
        depth = self.config["depth"]
        step = 2**depth
        halo = 6 * step - 4
        m = 1  # smallest bottom size whose output is at least one pixel
        while _output_from_bottom(m, depth) < 1:
            m += 1
        min_input = _output_from_bottom(m, depth) + 2 * halo
        return Geometry(halo=halo, step=step, min_input=min_input, shrink=2 * halo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        level = len(skips)
        for up, block in zip(self.up, self.decode):
            level -= 1
            x = up(x)
            x = block(torch.cat([_centre_crop(skips[level], x), x], dim=1))
        return self.head(x)


def _output_from_bottom(m: int, depth: int) -> int:
    """Output size of the expanding path for a bottom feature map of size `m`."""
    for _ in range(depth):
        m = 2 * m - 4
    return m


def _check_normalization(normalization, in_channels: int):
    if normalization is None:
        return None
    mean, std = (tuple(float(v) for v in part) for part in normalization)
    if len(mean) != in_channels or len(std) != in_channels or min(std) <= 0:
        raise ModelError(
            f"normalization needs {in_channels} means and {in_channels} positive stds; "
            f"got mean={mean}, std={std}"
        )
    return mean, std
