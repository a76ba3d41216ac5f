"""Run a network plane by plane over the stack axes of a larger input."""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelBase, describe

__all__ = ["PlaneWise"]


class PlaneWise(ModelBase):
    """`net` applied to every plane of a stack: a 2-d network over Z or T.

    Takes ``(N, C, *stack, H, W)`` and returns ``(N, K, *stack, h, w)``; the
    planes of all tiles of a batch go through `net` as one batch. Its
    geometry is the network's, `Geometry.stacked` over the stack axes (no
    context across planes), so the plan, the loader and the stitcher treat a
    stack like any volume.

    Parameters
    ----------
    net : torch.nn.Module
        The network for single planes (or single volumes).
    stack_axes : int
        Leading axes the input has beyond the network's own (1 for Z or T,
        2 for T and Z).

    Examples
    --------
    >>> import torch, tilesegment as ts
    >>> net = ts.UNet(1, 2, base_channels=4, depth=2)
    >>> stack = PlaneWise(net, 1)
    >>> stack.geometry.halo, stack.geometry.step
    ((0, 20, 20), (1, 4, 4))
    >>> stack(torch.rand(2, 1, 3, 44, 44)).shape
    torch.Size([2, 2, 3, 4, 4])
    """

    def __init__(self, net: nn.Module, stack_axes: int) -> None:
        super().__init__()
        facts = describe(net)
        self.net = net
        self.stack_axes = int(stack_axes)
        self.geometry = facts.geometry.stacked(self.stack_axes)
        self.normalization, self.metadata = facts.normalization, dict(facts.metadata)
        self.in_channels, self.num_classes = facts.in_channels, facts.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        stack = tuple(x.shape[2 : 2 + self.stack_axes])
        inner = x.shape[2 + self.stack_axes :]
        # (N, C, *stack, ...) -> (N * planes, C, ...): a view for channels-last batches.
        planes = x.movedim(1, 1 + self.stack_axes).reshape(-1, c, *inner)
        y = self.net(planes)
        if isinstance(y, (tuple, list)):
            y = y[0]
        return y.reshape(n, *stack, *y.shape[1:]).movedim(1 + self.stack_axes, 1)
