"""Shape inference on the ``meta`` device: one traced forward, and the geometry probe built on it.

A meta tensor has a shape and no data, so a forward pass over one computes
nothing and allocates nothing: it says what a network's output would be
and, with a hook on every layer, what each layer puts out. Executors plan
memory that way (`tilesegment.executor.estimate_bytes_per_tile`), the
benchmark counts operations (`tilesegment.bench.count_flops`), and
`probe_geometry` finds a module's geometry from the output sizes of many
inputs. All three go through `trace`.

TorchScript modules cannot take forward hooks (on their inner modules a
hook is accepted and never called): each TorchScript part of a model is
traced as one opaque layer, a `ScriptedPart`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from .errors import ModelError
from .geometry import Geometry

__all__ = ["trace", "ScriptedPart", "probe_geometry", "model_in_channels", "model_out_channels", "model_ndim",
           "main_output"]

_LIMIT = 4096

#: Called after every layer of a traced forward with ``(layer, inputs, output)``.
OnLayer = Callable[[nn.Module, tuple, Any], None]


def trace(model: nn.Module, input_shape: Sequence[int], on_layer: Optional[OnLayer] = None) -> Any:
    """Run `model` once on a meta tensor of `input_shape` and return its (meta) output.

    Parameters
    ----------
    model : torch.nn.Module
        Any module, TorchScript included; its weights are neither read nor moved.
    input_shape : sequence of int
        ``(N, C, *spatial)``.
    on_layer : callable, optional
        ``on_layer(layer, inputs, output)`` after every leaf module (one
        without children). A TorchScript part is one leaf, a `ScriptedPart`,
        whatever it holds.

    Returns
    -------
    Any
        What the model's forward returns, on the meta device.

    Examples
    --------
    >>> import tilesegment as ts
    >>> net = ts.UNet(1, 2, base_channels=4, depth=2)
    >>> trace(net, (1, 1, 60, 60)).shape
    torch.Size([1, 2, 20, 20])
    >>> trace(torch.jit.script(net), (1, 1, 60, 60)).shape
    torch.Size([1, 2, 20, 20])
    """
    return _MetaForward(model)(torch.empty(tuple(input_shape), device="meta"), on_layer)


class ScriptedPart(nn.Module):
    """A TorchScript module (or part of a model) in a meta-device trace: one layer.

    `original`, the module it stands for, is its one child: the stateless
    call swaps its weights for meta tensors through this Python module (it
    refuses a TorchScript module called directly), and the trace hooks this
    module, not the ones inside, which TorchScript does not let it hook.
    """

    def __init__(self, original: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.original = original

    def forward(self, *args: Any) -> Any:
        return self.original(*args)


class _MetaForward:
    """`model` made ready for meta-device forwards, once: the probe runs hundreds of them."""

    def __init__(self, model: nn.Module) -> None:
        if isinstance(model, torch.jit.ScriptModule):
            self.root, self.parts = ScriptedPart(model), {}
        else:
            self.root = model
            self.parts = {path: ScriptedPart(part) for path, part in _scripted_parts(model)}
        with self._swapped():
            self.state = {name: torch.empty_like(t, device="meta")
                          for name, t in [*self.root.named_parameters(), *self.root.named_buffers()]}

    def __call__(self, x: torch.Tensor, on_layer: Optional[OnLayer] = None) -> Any:
        from torch.func import functional_call

        with self._swapped(), _hooked(self.root, on_layer):
            return functional_call(self.root, self.state, (x,), strict=False)

    @contextlib.contextmanager
    def _swapped(self) -> Iterator[None]:
        # The model's TorchScript parts sit inside their stand-ins for one call, as
        # functional_call swaps its weights: the caller's module is itself again afterwards.
        # Like functional_call, not for a module that another thread runs at the same time.
        swapped = []
        try:
            for path, part in self.parts.items():
                parent_path, _, name = path.rpartition(".")
                parent = self.root.get_submodule(parent_path)
                swapped.append((parent, name, parent._modules[name]))
                parent._modules[name] = part
            yield
        finally:
            for parent, name, original in reversed(swapped):
                parent._modules[name] = original


def _scripted_parts(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.jit.ScriptModule]]:
    """The largest TorchScript submodules of a Python module, by path."""
    for name, child in module.named_children():
        if isinstance(child, torch.jit.ScriptModule):
            yield prefix + name, child
        else:
            yield from _scripted_parts(child, f"{prefix}{name}.")


def _layers(root: nn.Module) -> list[nn.Module]:
    """The leaves of a module tree, each once, a `ScriptedPart` counting as one."""
    inside = {id(m) for part in root.modules() if isinstance(part, ScriptedPart)
              for m in part.original.modules()}
    return [m for m in root.modules() if id(m) not in inside
            and (isinstance(m, ScriptedPart) or next(m.children(), None) is None)]


@contextlib.contextmanager
def _hooked(root: nn.Module, on_layer: Optional[OnLayer]) -> Iterator[None]:
    if on_layer is None:
        yield
        return
    handles = [m.register_forward_hook(lambda layer, inputs, output: on_layer(layer, inputs, output))
               for m in _layers(root)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _meta_runner(model: nn.Module) -> Callable[[torch.Tensor], Any]:
    """A callable running `model` on meta tensors without touching its weights."""
    return _MetaForward(model)


def model_in_channels(model: nn.Module) -> Optional[int]:
    """Input channels of the first convolution of `model`, or None."""
    for module in model.modules():
        # TorchScript modules keep the class name in `original_name`.
        kind = getattr(module, "original_name", type(module).__name__)
        if kind in ("Conv2d", "Conv3d", "ConvTranspose2d", "ConvTranspose3d"):
            if hasattr(module, "in_channels"):
                return int(module.in_channels)
            weight = module.weight
            return int(weight.shape[0] if kind.startswith("ConvTranspose") else weight.shape[1])
    return None


def _has_spatial_kernel(model: nn.Module) -> bool:
    for module in model.modules():
        kind = getattr(module, "original_name", type(module).__name__)
        size = getattr(module, "kernel_size", None)
        if kind.startswith("Conv") and size is not None and max(size) > 1:
            return True
    return False


def main_output(y: Any) -> Any:
    """The segmentation in what a forward returns: the first element of a tuple or list,
    the first value of a dict (torchvision's ``{"out": ..., "aux": ...}``), else `y` itself.

    Examples
    --------
    >>> main_output({"out": "logits", "aux": "auxiliary"})
    'logits'
    """
    if isinstance(y, (tuple, list)):
        y = y[0]
    if isinstance(y, dict):
        y = next(iter(y.values()))
    return y


def _output_shape(run, in_channels: int, *sizes: int):
    x = torch.empty((1, in_channels, *sizes), device="meta")
    try:
        y = main_output(run(x))
    except Exception:  # an invalid size raises anything from anywhere
        return None
    if not hasattr(y, "shape") or y.ndim != 2 + len(sizes) or min(y.shape[2:]) < 1:
        return None
    return tuple(int(s) for s in y.shape)


def model_out_channels(model: nn.Module, geometry: Geometry, in_channels: Optional[int] = None) -> int:
    """Output channels (classes) of `model`: what one meta-device forward pass at the
    smallest valid input gives."""
    in_channels = in_channels or model_in_channels(model) or 1
    shape = _output_shape(_meta_runner(model), in_channels, *geometry.min_input)
    if shape is None:
        raise ModelError(f"model fails on its smallest valid input {geometry.min_input}")
    return int(shape[1])


def model_ndim(model: nn.Module) -> int:
    """Spatial axes of `model`: 3 if it has a 3-d convolution or pooling, else 2."""
    for module in model.modules():
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
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"cannot find the geometry of {type(model).__name__}: pass a torch.nn.Module "
            "or a ts.Geometry(halo=..., step=...)"
        )
    in_channels = in_channels or model_in_channels(model)
    if in_channels is None:
        raise ModelError("model has no convolution to take in_channels from; pass in_channels=")
    ndim = model_ndim(model)
    was_training = model.training
    model.eval()
    try:
        run = _meta_runner(model)
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
