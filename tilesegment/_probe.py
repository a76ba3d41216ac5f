"""Find a module's geometry by shape inference on the ``meta`` device."""

from __future__ import annotations

from typing import Optional

from .errors import ModelError
from .geometry import Geometry

__all__ = ["probe_geometry", "model_in_channels", "model_out_channels"]

_LIMIT = 4096


def model_in_channels(model: object) -> Optional[int]:
    """Input channels of the first convolution of `model` (or its declared ``in_channels``), or None."""
    for module in model.modules():  # type: ignore[attr-defined]
        # TorchScript modules keep the class name in `original_name`.
        kind = getattr(module, "original_name", type(module).__name__)
        if kind in ("Conv2d", "Conv3d", "ConvTranspose2d", "ConvTranspose3d"):
            if hasattr(module, "in_channels"):
                return int(module.in_channels)
            weight = module.weight
            return int(weight.shape[0] if kind.startswith("ConvTranspose") else weight.shape[1])
    declared = getattr(model, "in_channels", None)  # wrappers without convolutions (ONNX)
    return declared if isinstance(declared, int) else None


def _has_spatial_kernel(model) -> bool:
    for module in model.modules():
        kind = getattr(module, "original_name", type(module).__name__)
        size = getattr(module, "kernel_size", None)
        if kind.startswith("Conv") and size is not None and max(size) > 1:
            return True
    return False


def _meta_runner(model):
    """A callable running `model` on meta tensors without touching its weights."""
    import io

    import torch
    from torch.func import functional_call

    if isinstance(model, torch.jit.ScriptModule):
        # The stateless API refuses TorchScript; a reload onto meta has no data either.
        buffer = io.BytesIO()
        torch.jit.save(model, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer, map_location="meta")
    state = {
        name: torch.empty_like(t, device="meta")
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    }
    return lambda x: functional_call(model, state, (x,), strict=False)


def _output_shape(run, in_channels: int, *sizes: int):
    import torch

    x = torch.empty((1, in_channels, *sizes), device="meta")
    try:
        y = run(x)
    except Exception:  # an invalid size raises anything from anywhere
        return None
    if isinstance(y, (tuple, list)):
        y = y[0]
    if isinstance(y, dict):
        y = next(iter(y.values()))
    if not hasattr(y, "shape") or y.ndim != 2 + len(sizes) or min(y.shape[2:]) < 1:
        return None
    return tuple(int(s) for s in y.shape)


def model_out_channels(model: object, geometry: Geometry) -> int:
    """Output channels (classes) of `model`: its declared ``num_classes``, or what one
    meta-device forward pass gives."""
    declared = getattr(model, "num_classes", None)
    if isinstance(declared, int):
        return declared
    in_channels = model_in_channels(model) or 1
    shape = _output_shape(_meta_runner(model), in_channels, *geometry.min_input)
    if shape is None:
        raise ModelError(f"model fails on its smallest valid input {geometry.min_input}")
    return int(shape[1])


def model_ndim(model: object) -> int:
    """Spatial axes of `model`: 3 if it has a 3-d convolution or pooling, else 2."""
    for module in model.modules():  # type: ignore[attr-defined]
        kind = getattr(module, "original_name", type(module).__name__)
        if kind.endswith("3d"):
            return 3
    return 2


def _scan_axis(run, in_channels: int, sizes: list, axis: int) -> tuple[int, list]:
    """Grow the input along `axis` (the others fixed at `sizes`) and return the largest
    output-minus-input gain and the first sizes reaching it, three of them when evenly spaced."""
    best, valid, n = None, [], 1
    while n < _LIMIT:
        trial = list(sizes)
        trial[axis] = n
        shape = _output_shape(run, in_channels, *trial)
        if shape is not None:
            gain = shape[2 + axis] - n
            if best is None or gain > best:
                best, valid = gain, [n]
            elif gain == best:
                valid.append(n)
            if len(valid) >= 3 and valid[2] - valid[1] == valid[1] - valid[0]:
                break
        n += 1
    return best, valid


def probe_geometry(model: object, in_channels: Optional[int] = None) -> Geometry:
    """Probe `model` with meta tensors and derive its geometry, axis by axis.

    A cube of growing edge finds a size the model runs at; then each axis
    grows alone while the others stay there. Valid inputs are those where
    the output is largest relative to the input (floor-pooling networks
    accept other sizes silently but shift the pooling grid); they must be
    evenly spaced. Convolutions, pooling and centre crops act on each axis
    on its own, so the axes can be probed one at a time, and anisotropic
    networks get a halo and step per axis. The result is checked against a
    second probe at a large, non-cubic valid size.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ModelError(
            f"cannot find the geometry of {type(model).__name__}: pass a torch.nn.Module "
            "or a ts.Geometry(halo=..., step=...)"
        )
    in_channels = in_channels or model_in_channels(model)
    if in_channels is None:
        raise ModelError("model has no convolution to take in_channels from; pass in_channels=")
    ndim = model_ndim(model)
    run = _meta_runner(model)
    was_training = model.training
    model.eval()
    try:
        start = next((n for n in range(1, _LIMIT) if _output_shape(run, in_channels, *(n,) * ndim)), None)
        found = [_scan_axis(run, in_channels, [start] * ndim, a) for a in range(ndim)] if start else []
        if not found or any(best is None or len(valid) < 3 for best, valid in found):
            raise ModelError(
                f"model output does not grow with its input for sizes up to {_LIMIT}; "
                "declare its geometry with ts.Geometry(halo=..., step=...)"
            )
        step = tuple(valid[1] - valid[0] for _, valid in found)
        shrink = tuple(-best for best, _ in found)
        if max(shrink) == 0 and _has_spatial_kernel(model):
            raise ModelError(
                f"{type(model).__name__} pads internally (its output is as large as its input), "
                "so tiles would see zero padding at their borders; declare a context margin: "
                f"model.geometry = ts.Geometry(halo=..., step={step[-1]}) (see docs/exactness.md)"
            )
        geom = Geometry(halo=tuple((s + 1) // 2 for s in shrink), step=step,
                        min_input=tuple(valid[0] for _, valid in found), shrink=shrink)
        # Second probe: a large, non-cubic valid size must follow the same arithmetic.
        big = tuple(m + k * st for m, st, k in zip(geom.min_input, step, (37, 5, 11)[-ndim:]))
        shape = _output_shape(run, in_channels, *big)
        if shape is None or shape[2:] != geom.output_size(big):
            raise ModelError(
                f"model geometry is inconsistent: input {big} gave output "
                f"{None if shape is None else shape[2:]}, expected {geom.output_size(big)}; "
                "declare it with ts.Geometry(halo=..., step=...)"
            )
        return geom
    finally:
        model.train(was_training)
