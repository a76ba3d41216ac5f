"""The `tilesegment.contracts.Model` facts of a network, for our backends and for any module.

A backend that knows its facts (our `UNet`, `OnnxModel`, `PlaneWise`, a
bioimage.io package) subclasses `ModelBase` and sets them; `describe` gives
every other ``torch.nn.Module`` (a user's module, TorchScript) the same
facts through `ProbedModel`, which takes what the module declares and finds
the rest by shape inference on the meta device, once. The engine reads a
model only through these names: ``describe(model).geometry``, never
``getattr(model, "geometry", None)``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..contracts import Model
from ..errors import ModelError
from ..geometry import Geometry

__all__ = ["ModelBase", "ProbedModel", "describe", "state_hash", "moved"]


def moved(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """``module.to(*args, **kwargs)``, in place, without the warnings of TorchScript parts."""
    with warnings.catch_warnings():
        # nn.Module.to looks at every parameter's `.grad`; TorchScript's parameters warn.
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
        return module.to(*args, **kwargs)


def state_hash(module: nn.Module) -> str:
    """SHA-256 of a module's class name and weights (state dict), first 16 hex digits.

    The resume identity of every built-in backend; its values are those of
    the manifests tilesegment has always written, so their outputs resume.
    """
    digest = hashlib.sha256(type(module).__name__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class ModelBase(nn.Module):
    """A torch module that states the `tilesegment.contracts.Model` facts itself.

    Subclasses set `geometry` (an attribute or a property) and whichever of
    the other facts they know; the defaults say "not known" (None) or
    "nothing" (no metadata). `replicate` and `identity` work for any module
    whose state dict holds its weights and that `copy.deepcopy` can copy;
    override them otherwise.
    """

    # No annotations here: torch.jit.script reads class annotations, and cannot read these.
    # `geometry` (a Geometry) has no default: every backend states its own.
    #: ``(means, stds)`` per channel, applied after integers are scaled to [0, 1]; None: none.
    normalization = None
    in_channels = None  # C, or None when the model cannot say
    num_classes = None  # K, or None when the model cannot say
    #: Whether the model's device memory comes from torch's allocator, so that the executor
    #: can measure a batch's peak (False for onnxruntime, which has an arena of its own).
    torch_memory = True

    def __init__(self) -> None:
        super().__init__()
        #: JSON-like facts to keep with the model (``classes``: class names).
        self.metadata: dict = {}

    def replicate(self, device: torch.device) -> "ModelBase":
        """An independent copy on `device`, in eval mode; this model is neither moved nor changed."""
        return moved(copy.deepcopy(self), device).eval()

    def identity(self) -> str:
        """A short hash of the weights (`state_hash`), stable across processes, for resume."""
        return state_hash(self)

    def activation_bytes(self, input_size: tuple[int, ...]) -> Optional[int]:
        """Bytes of every layer's output for one input, when known in closed form; None: trace it.

        `tilesegment.executor.estimate_bytes_per_tile` otherwise sums them over
        a meta-device forward.
        """
        return None


class ProbedModel(ModelBase):
    """Any ``torch.nn.Module`` with the `~tilesegment.contracts.Model` facts, for the engine.

    The facts the module declares as attributes are kept (``geometry``,
    ``normalization``, ``in_channels``, ``num_classes``, ``metadata``: how a
    "same"-padded network states its context margin, or a factory its
    normalization); the others are found on the meta device the first time
    they are asked for (`tilesegment._probe`). ``forward`` is the module's.

    Parameters
    ----------
    module : torch.nn.Module
        The network (TorchScript included). It is held, not copied.
    in_channels : int, optional
        Input channels, for a module that has no convolution to take them from.
    """

    def __init__(self, module: nn.Module, in_channels: Optional[int] = None) -> None:
        super().__init__()
        self.module = module
        if in_channels is not None:
            self.__dict__["in_channels"] = int(in_channels)  # where the cached property keeps it
        self.normalization = getattr(module, "normalization", None)
        self.metadata = dict(getattr(module, "metadata", None) or {})

    @functools.cached_property
    def in_channels(self) -> Optional[int]:  # type: ignore[override]
        from .._probe import model_in_channels

        declared = getattr(self.module, "in_channels", None)
        return declared if isinstance(declared, int) else model_in_channels(self.module)

    @functools.cached_property
    def geometry(self) -> Geometry:  # type: ignore[override]
        from .._probe import probe_geometry

        declared = getattr(self.module, "geometry", None)
        return declared if isinstance(declared, Geometry) else probe_geometry(self.module, self.in_channels)

    @functools.cached_property
    def num_classes(self) -> int:  # type: ignore[override]
        from .._probe import model_out_channels

        declared = getattr(self.module, "num_classes", None)
        if isinstance(declared, int):
            return declared
        return model_out_channels(self.module, self.geometry, self.in_channels)

    def identity(self) -> str:
        """The module's own `state_hash` (the wrapper adds nothing to its weights)."""
        return state_hash(self.module)

    def forward(self, x: torch.Tensor) -> Any:
        return self.module(x)

    def extra_repr(self) -> str:
        return "probed"


def describe(module: Any, in_channels: Optional[int] = None) -> Model:
    """`module` with the facts of a `tilesegment.contracts.Model`: itself if it has them, else a `ProbedModel`.

    Parameters
    ----------
    module : torch.nn.Module
        Our backends and modules that implement the contract are returned as
        they are; any other module is wrapped.
    in_channels : int, optional
        Input channels of a wrapped module that has no convolution to take them from.

    Returns
    -------
    Model
        ``geometry``, ``normalization``, ``in_channels``, ``num_classes``,
        ``metadata``, ``replicate(device)``, ``identity()``.

    Raises
    ------
    ModelError
        If `module` is not a ``torch.nn.Module``.

    Examples
    --------
    >>> import torch
    >>> net = describe(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 3)))
    >>> net.geometry.halo, net.in_channels, net.num_classes
    ((2, 2), 3, 2)
    """
    if isinstance(module, ModelBase):
        return module
    if not isinstance(module, nn.Module):
        raise ModelError(f"cannot run {type(module).__name__} as a model: pass a torch.nn.Module "
                         "or anything ts.load_model accepts")
    if isinstance(module, Model):  # a third-party backend that states the facts itself
        return module
    return ProbedModel(module, in_channels)
