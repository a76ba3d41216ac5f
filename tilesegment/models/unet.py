"""The valid-convolution U-Net of Ronneberger et al. (2015), configurable."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..errors import ModelError
from ..geometry import Geometry
from .base import ModelBase

__all__ = ["UNet"]


_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_UP = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}


def _double_conv(c_in: int, c_out: int, ndim: int = 2) -> nn.Sequential:
    # Two 3x3(x3) *valid* convolutions: no zero padding anywhere in the network.
    conv = _CONV[ndim]
    return nn.Sequential(
        conv(c_in, c_out, 3),
        nn.ReLU(inplace=True),
        conv(c_out, c_out, 3),
        nn.ReLU(inplace=True),
    )


def _centre_crop(skip: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    for d in range(2, skip.dim()):
        skip = skip.narrow(d, (skip.shape[d] - like.shape[d]) // 2, like.shape[d])
    return skip


class UNet(ModelBase):
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
    ndim : {2, 3}
        Spatial axes: 2 for images (the paper), 3 for volumes (the 3-D U-Net
        of Çiçek et al. 2016, 3x3x3 valid convolutions).
    pooling : sequence of int or of tuples, optional
        Pooling factor per level (``depth`` entries, top level first), each
        1 or 2, per axis: ``[(1, 2, 2), (2, 2, 2), (2, 2, 2)]`` pools only in
        y and x at the first level, for anisotropic volumes whose z spacing
        is coarser. Default: 2 on every axis at every level. Halo and step
        then differ per axis; the geometry stays analytic.

    Examples
    --------
    >>> import torch, tilesegment as ts
    >>> net = ts.UNet(in_channels=1, num_classes=2, base_channels=4, depth=2)
    >>> net(torch.zeros(1, 1, 60, 60)).shape
    torch.Size([1, 2, 20, 20])
    >>> vol = ts.UNet(1, 2, base_channels=2, depth=2, ndim=3, pooling=[(1, 2, 2), (2, 2, 2)])
    >>> vol.geometry.halo, vol.geometry.step
    ((12, 20, 20), (2, 4, 4))
    """

    __jit_unused_properties__ = ["geometry"]  # lets torch.jit.script export the network

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_channels: int = 64,
        depth: int = 4,
        normalization: Optional[tuple[Sequence[float], Sequence[float]]] = None,
        *,
        ndim: int = 2,
        pooling: Optional[Sequence[Union[int, Sequence[int]]]] = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or base_channels < 1 or depth < 0:
            raise ModelError(
                f"UNet needs in_channels, num_classes, base_channels >= 1 and depth >= 0; got "
                f"{in_channels}, {num_classes}, {base_channels}, {depth}"
            )
        if ndim not in _CONV:
            raise ModelError(f"UNet ndim {ndim} is not supported; use 2 (images) or 3 (volumes)")
        factors = _check_pooling(pooling, depth, ndim)
        self.config = dict(
            in_channels=int(in_channels),
            num_classes=int(num_classes),
            base_channels=int(base_channels),
            depth=int(depth),
        )
        if ndim != 2 or pooling is not None:  # today's 2-D checkpoints keep today's config
            self.config.update(ndim=ndim, pooling=[list(f) for f in factors])
        self.factors = factors
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.normalization = _check_normalization(normalization, in_channels)
        widths = [base_channels * 2**d for d in range(depth + 1)]
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths[:-1]:
            self.down.append(_double_conv(c, w, ndim))
            c = w
        self.bottom = _double_conv(c, widths[-1], ndim)
        self.up = nn.ModuleList()
        self.decode = nn.ModuleList()
        for w, f in zip(reversed(widths[:-1]), reversed(factors)):
            self.up.append(_UP[ndim](2 * w, w, f, stride=f))
            self.decode.append(_double_conv(2 * w, w, ndim))
        self.head = _CONV[ndim](widths[0], num_classes, 1)
        # Parameter-free, so the state dict of a 2-D network is what it always was.
        self.pools = nn.ModuleList(_POOL[ndim](f) for f in factors)

    @property
    def geometry(self) -> Geometry:
        """Analytic geometry, per axis: every level loses 2 pixels per side at its scale."""
        halo, step, min_input = [], [], []
        for axis_factors in zip(*self.factors) if self.factors else [()] * self.config.get("ndim", 2):
            m = 1  # smallest bottom size whose output is at least one pixel
            while _output_from_bottom(m, axis_factors) < 1:
                m += 1
            out = _output_from_bottom(m, axis_factors)
            n_in = m + 4
            for f in reversed(axis_factors):
                n_in = f * n_in + 4
            halo.append((n_in - out) // 2)
            step.append(math.prod(axis_factors))
            min_input.append(n_in)
        return Geometry(halo=tuple(halo), step=tuple(step), min_input=tuple(min_input),
                        shrink=tuple(2 * h for h in halo))

    def activation_bytes(self, input_size: Sequence[int]) -> int:  # type: ignore[override]
        """Bytes of every layer's float32 output for one input of `input_size`, in closed form.

        The sum that `tilesegment.executor.estimate_bytes_per_tile` takes over
        a meta-device forward of any other module (an upper bound on the
        activations of one tile), without that forward: its first call in a
        process imports sympy and torch._dynamo, about 1.5 s.

        Examples
        --------
        >>> from tilesegment.executor import estimate_bytes_per_tile
        >>> net = UNet(3, 2, base_channels=4, depth=2)
        >>> net.activation_bytes((92, 92)) == estimate_bytes_per_tile(net, 3, (92, 92), analytic=False)
        True
        """
        sizes = [int(n) for n in input_size]
        total = 0

        def double_conv(width: int) -> None:
            nonlocal sizes, total
            for _ in range(2):  # a convolution and its (in-place) ReLU, each an output
                sizes = [n - 2 for n in sizes]
                total += 2 * width * math.prod(sizes)

        widths = [self.config["base_channels"] * 2**d for d in range(self.config["depth"] + 1)]
        for width, factors in zip(widths, self.factors):
            double_conv(width)
            sizes = [n // f for n, f in zip(sizes, factors)]
            total += width * math.prod(sizes)
        double_conv(widths[-1])
        for width, factors in zip(reversed(widths[:-1]), reversed(self.factors)):
            sizes = [n * f for n, f in zip(sizes, factors)]
            total += width * math.prod(sizes)
            double_conv(width)
        return 4 * (total + self.config["num_classes"] * math.prod(sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for block, pool in zip(self.down, self.pools):
            x = block(x)
            skips.append(x)
            x = pool(x)
        x = self.bottom(x)
        level = len(skips)
        for up, block in zip(self.up, self.decode):
            level -= 1
            x = up(x)
            x = block(torch.cat([_centre_crop(skips[level], x), x], dim=1))
        return self.head(x)


def _output_from_bottom(m: int, factors: Sequence[int]) -> int:
    """Output size, along one axis, of the expanding path for a bottom feature map of size `m`."""
    for f in reversed(factors):
        m = f * m - 4
    return m


def _check_pooling(pooling, depth: int, ndim: int) -> tuple[tuple[int, ...], ...]:
    """Pooling factors per level and axis: 1 or 2 each, `depth` levels."""
    if pooling is None:
        return tuple((2,) * ndim for _ in range(depth))
    factors = tuple((int(f),) * ndim if isinstance(f, int) else tuple(int(v) for v in f) for f in pooling)
    if len(factors) != depth or any(len(f) != ndim or not set(f) <= {1, 2} for f in factors):
        raise ModelError(
            f"pooling {list(pooling)} needs {depth} levels of 1 or 2 per axis ({ndim} axes), "
            f"e.g. {[(1,) + (2,) * (ndim - 1)] + [(2,) * ndim] * (depth - 1)}"
        )
    return factors


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
