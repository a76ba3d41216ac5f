"""Cost figures of a network: FLOPs per written pixel, halo overhead."""

from __future__ import annotations

import torch
from torch import nn

from .geometry import Geometry, Pair

__all__ = ["count_flops", "flops_per_pixel", "PEAK_TFLOPS"]

#: Dense bf16/fp16 tensor-core peaks (TFLOP/s) by device-name fragment, for efficiency figures.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
               "A10": 125.0, "L4": 121.0, "V100": 125.0, "RTX 4090": 165.0}


def count_flops(model: nn.Module, in_channels: int, input_size: Pair) -> int:
    """Floating-point operations (multiply + add = 2) of one forward pass on one input.

    Counts convolutions, transposed convolutions and linear layers, which are
    all but a negligible part of a U-Net's work; measured on the meta device.
    """
    from torch.func import functional_call

    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += 2 * output.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.ConvTranspose2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += 2 * inputs[0].numel() * module.out_channels * k
        elif isinstance(module, nn.Linear):
            total += 2 * output.numel() * module.in_features

    state = {k: torch.empty_like(v, device="meta") for k, v in [*model.named_parameters(), *model.named_buffers()]}
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        functional_call(model, state, (torch.empty(1, in_channels, *input_size, device="meta"),), strict=False)
    finally:
        for h in handles:
            h.remove()
    return total


def flops_per_pixel(model: nn.Module, in_channels: int, geometry: Geometry, tile_size: Pair) -> float:
    """FLOPs per *written* output pixel at `tile_size` (halo overhead included)."""
    n_in = geometry.input_size(tile_size)
    return count_flops(model, in_channels, n_in) / (tile_size[0] * tile_size[1])
