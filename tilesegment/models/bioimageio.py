"""bioimage.io model packages (``rdf.yaml`` or a ``.zip``) as tilesegment models.

The model description (spec 0.5) says everything tilesegment needs: the
input's ``ParameterizedSize(min, step)`` gives the valid input sizes and the
step, the output's ``SizeReference`` offset what a valid-convolution network
loses, and its ``halo`` what is unreliable at the borders. The pre- and
postprocessing steps that act on each pixel alone run on every tile, exactly
as the spec defines them; steps that need statistics of the whole image
(``zero_mean_unit_variance``, ``scale_range``, ``scale_mean_variance``) are
refused, since computing them per tile would silently give every tile its
own normalization.

**Loading a package runs its code**: a ``pytorch_state_dict`` model's
architecture is a Python file (or library callable) in the package that is
imported and called. bioimageio.spec checks every file's SHA-256 against
the description first. TorchScript weights are preferred when present (no
Python code runs), then ONNX, then the state dict.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from ..errors import ModelError, cause
from ..geometry import Geometry
from .base import ModelBase

__all__ = ["BioimageioModel", "load_bioimageio", "is_bioimageio", "check_test_tensors"]

#: Steps that need statistics of the whole image (or data set): not computable per tile.
_NEEDS_STATISTICS = {
    "zero_mean_unit_variance": "the mean and std of the whole image",
    "scale_range": "percentiles of the whole image",
    "scale_mean_variance": "the mean and variance of a reference tensor",
}
_WEIGHTS_ORDER = ("torchscript", "onnx", "pytorch_state_dict")


def is_bioimageio(path: Path) -> bool:
    """Whether `path` names a bioimage.io description or package."""
    name = path.name.lower()
    return name.endswith(("rdf.yaml", "rdf.yml", ".bioimageio.yaml")) or (
        name.endswith(".zip") and _zip_has_rdf(path)
    )


def _zip_has_rdf(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith(("rdf.yaml", "bioimageio.yaml")) for n in archive.namelist())
    except Exception:  # a damaged zip directory fails in kind (BadZipFile, UnicodeDecodeError...)
        return False


class _PixelOp(nn.Module):
    """One pre/postprocessing step that acts on each value alone (per channel at most)."""

    def __init__(self, kind: str, **params: Any) -> None:
        super().__init__()
        self.kind = kind
        for name, value in params.items():
            if value is not None and not isinstance(value, str):
                value = torch.as_tensor(np.asarray(value, dtype=np.float32))
                self.register_buffer(name, value.reshape(1, -1, 1, 1) if value.ndim else value)
            else:
                setattr(self, name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "scale_linear":
            return x * self.gain + self.offset
        if self.kind == "fixed_zero_mean_unit_variance":
            return (x - self.mean) / (self.std + self.eps)
        if self.kind == "sigmoid":
            return torch.sigmoid(x)
        if self.kind == "clip":
            lo = getattr(self, "min", None)
            hi = getattr(self, "max", None)
            return torch.clamp(x, min=None if lo is None else float(lo), max=None if hi is None else float(hi))
        if self.kind == "binarize":
            return (x > self.threshold).to(x.dtype)
        if self.kind == "ensure_dtype":
            dtype = getattr(torch, self.dtype)
            return x.to(dtype).to(torch.float32) if x.device.type != "meta" else x
        raise AssertionError(self.kind)


def _pixel_op(step: Any, where: str, name: str) -> Optional[_PixelOp]:
    """Our op for one spec step, or a `ModelError` that says why it cannot run per tile."""
    kind = step.id
    kwargs = step.kwargs
    if kind in _NEEDS_STATISTICS:
        raise ModelError(
            f"{name}: {where} step {kind!r} needs {_NEEDS_STATISTICS[kind]}, which differs tile by "
            "tile; tilesegment refuses to normalize each tile on its own. Use a model whose "
            "description has fixed values (fixed_zero_mean_unit_variance, scale_linear)"
        )
    axis = getattr(kwargs, "axis", None)
    if axis is not None and str(axis) != "channel":
        raise ModelError(f"{name}: {where} step {kind!r} along axis {axis!r} is not supported "
                         "(only along 'channel')")
    if kind == "scale_linear":
        return _PixelOp(kind, gain=kwargs.gain, offset=kwargs.offset)
    if kind == "fixed_zero_mean_unit_variance":
        return _PixelOp(kind, mean=kwargs.mean, std=kwargs.std, eps=0.0)
    if kind == "sigmoid":
        return _PixelOp(kind)
    if kind == "clip":
        return _PixelOp(kind, min=kwargs.min, max=kwargs.max)
    if kind == "binarize":
        return _PixelOp(kind, threshold=kwargs.threshold)
    if kind == "ensure_dtype":
        if str(kwargs.dtype) == "float32":
            return None
        return _PixelOp(kind, dtype=str(kwargs.dtype))
    raise ModelError(f"{name}: {where} step {kind!r} is not supported by tilesegment")


def _axes(tensor: Any, name: str, role: str) -> dict[str, Any]:
    ids = [str(a.id) for a in tensor.axes]
    if ids != ["batch", "channel", "y", "x"]:
        raise ModelError(f"{name}: {role} tensor {str(tensor.id)!r} has axes {ids}; tilesegment runs "
                         "2-d models with axes [batch, channel, y, x]")
    return {str(a.id): a for a in tensor.axes}


def geometry_of(descr: Any) -> Geometry:
    """The `Geometry` a bioimage.io model description declares (see the module docstring)."""
    from bioimageio.spec.model.v0_5 import ParameterizedSize, SizeReference

    name = str(descr.name)
    inp, out = descr.inputs[0], descr.outputs[0]
    in_axes, out_axes = _axes(inp, name, "input"), _axes(out, name, "output")
    min_input, step, shrink, halo = [], [], [], []
    for axis_id in ("y", "x"):
        size = in_axes[axis_id].size
        if not isinstance(size, ParameterizedSize):
            raise ModelError(
                f"{name}: input axis {axis_id!r} has a fixed size ({size!r}); tiles of other sizes "
                "cannot run. tilesegment needs ParameterizedSize(min, step) spatial axes"
            )
        out_axis = out_axes[axis_id]
        ref = out_axis.size
        if (not isinstance(ref, SizeReference) or str(ref.tensor_id) != str(inp.id)
                or str(ref.axis_id) != axis_id or float(out_axis.scale) != float(in_axes[axis_id].scale)):
            raise ModelError(
                f"{name}: output axis {axis_id!r} is not the input's {axis_id!r} axis plus an "
                "offset at the same scale; tilesegment needs outputs the size of their input"
            )
        if ref.offset > 0 or -ref.offset % 2:
            raise ModelError(f"{name}: output offset {ref.offset} on {axis_id!r} is not an even "
                             "shrink; cannot centre the output on the input")
        out_halo = int(getattr(out_axis, "halo", 0) or 0)
        min_input.append(int(size.min))
        step.append(int(size.step))
        shrink.append(-int(ref.offset))
        halo.append(-int(ref.offset) // 2 + out_halo)
    return Geometry(halo=tuple(halo), step=tuple(step), min_input=tuple(min_input), shrink=tuple(shrink))


class BioimageioModel(ModelBase):
    """A bioimage.io model with its per-pixel pre/postprocessing, as one torch module.

    Made by `load_bioimageio`; ``forward`` takes ``(N, C, H, W)`` float32 as
    tilesegment feeds it (integers scaled to [0, 1], floats as they are) and
    applies the description's preprocessing, the network and its
    postprocessing.
    """

    def __init__(self, network: nn.Module, geometry: Geometry, pre: list, post: list,
                 in_channels: int, name: str, source: str, weights: str,
                 test_tensors: tuple[np.ndarray, np.ndarray]) -> None:
        super().__init__()
        self.network = network
        self.pre = nn.Sequential(*pre)
        self.post = nn.Sequential(*post)
        self.geometry = geometry
        self.in_channels = in_channels
        self.num_classes = int(test_tensors[1].shape[1])  # (batch, channel, y, x), as checked at load
        #: Plain values only (the description holds open files): the executor copies models.
        self.name = name
        self.source = source
        self.weights_format = weights
        self.test_tensors = test_tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.network(self.pre(x))
        if isinstance(y, (tuple, list)):
            y = y[0]
        return self.post(y)

    @property
    def torch_memory(self) -> bool:  # type: ignore[override]
        return getattr(self.network, "torch_memory", True)

    def activation_bytes(self, input_size: tuple[int, ...]) -> Optional[int]:
        """The network's own estimate, when it has one (ONNX weights, whose layers no trace sees).

        The per-pixel pre- and postprocessing add a few maps of the input's size.
        """
        return self.network.activation_bytes(input_size) if isinstance(self.network, ModelBase) else None

    def extra_repr(self) -> str:
        return f"{self.name!r} ({self.weights_format}), geometry={self.geometry}"


def load_bioimageio(source: Union[str, os.PathLike], weights: Optional[str] = None) -> BioimageioModel:
    """Load a bioimage.io model package or ``rdf.yaml`` (spec 0.5) as a tilesegment model.

    Validates the description and the SHA-256 of every file it names
    (bioimageio.spec), picks weights (TorchScript, then ONNX, then the
    PyTorch state dict, whose architecture code is imported and run), and
    wraps the network with the per-pixel pre/postprocessing.

    Parameters
    ----------
    source : path
        ``rdf.yaml`` (files beside it) or a ``.zip`` package.
    weights : str, optional
        Weights format to use: "torchscript", "onnx" or "pytorch_state_dict".

    Raises
    ------
    ModelError
        If bioimageio.spec/core are missing, the description is invalid (a
        checksum differs, a field is wrong), or it needs something tilesegment
        cannot do per tile (whole-image statistics, fixed spatial sizes, more
        than one input or output).
    """
    try:
        from bioimageio.spec import load_model_description
    except ImportError:
        raise ModelError("bioimage.io models need bioimageio.spec and bioimageio.core: "
                         "pip install bioimageio.spec bioimageio.core") from None
    text = os.fspath(source)
    _check_members(Path(text))
    try:
        descr = load_model_description(text, perform_io_checks=True, format_version="latest")
    except Exception as exc:
        first = str(exc).strip().splitlines()
        raise ModelError(f"{Path(text).name} is not a valid bioimage.io model ({type(exc).__name__}: "
                         f"{' '.join(first[:3])})") from None
    name = str(descr.name)
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise ModelError(f"{name}: has {len(descr.inputs)} inputs and {len(descr.outputs)} outputs; "
                         "tilesegment runs models with one of each")
    try:
        geometry = geometry_of(descr)
        inp, out = descr.inputs[0], descr.outputs[0]
        in_channels = int(_axes(inp, name, "input")["channel"].size)
        pre = [op for step in inp.preprocessing if (op := _pixel_op(step, "preprocessing", name))]
        post = [op for step in out.postprocessing if (op := _pixel_op(step, "postprocessing", name))]
        network, used = _load_network(descr, weights, geometry)
    except ModelError as exc:  # our messages name the model; the file is what a user has at hand
        path = Path(text)
        raise ModelError(f"{path.name if path.suffix.lower() == '.zip' else path.parent.name + '/' + path.name}: "
                         f"{exc}") from None
    from bioimageio.spec.utils import load_array

    tests = (load_array(inp.test_tensor).astype(np.float32), load_array(out.test_tensor).astype(np.float32))
    return BioimageioModel(network, geometry, pre, post, in_channels, name, text, used, tests).eval()


def _check_members(path: Path) -> None:
    """Refuse a package whose zip names a member outside the package (``../x``, ``/x``, ``C:x``).

    Such a member has no place in a package; unpacking it naively would write
    outside the package's folder (a "zip slip"), so the package is refused
    before any of it is read or unpacked.
    """
    import zipfile
    from pathlib import PurePosixPath, PureWindowsPath

    if path.suffix.lower() != ".zip":
        return
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception as exc:
        raise ModelError(f"{path.name} is not a readable zip package ({cause(exc)})") from None
    for name in names:
        posix, windows = PurePosixPath(name), PureWindowsPath(name)
        if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts + windows.parts:
            raise ModelError(f"{path.name} has a member {name!r} outside the package; a package that could "
                             "write outside its folder is refused. Rebuild it, or get it from its source")
    missing = _missing_sources(_archive_yaml(path, names), set(names))
    if missing:
        raise ModelError(f"{path.name} names the file {missing!r}, which the package does not contain; the "
                         "package is incomplete. Rebuild it, or get it from its source")


def _archive_yaml(path: Path, names: list[str]) -> Any:
    """The parsed description inside the package at `path`, or None when it does not parse
    (bioimageio.spec then says why)."""
    import zipfile

    import yaml

    rdf = next((n for n in names if n.endswith(("rdf.yaml", "bioimageio.yaml"))), None)
    if rdf is None:
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return yaml.safe_load(archive.read(rdf))
    except Exception:  # a damaged description: bioimageio.spec reports it in its own words
        return None


def _missing_sources(node: Any, members: set[str]) -> Optional[str]:
    """The first file a description names (``source:`` without a URL scheme) that is not in `members`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "source" and isinstance(value, str) and "://" not in value and (
                    value.removeprefix("./") not in members):
                return value
            found = _missing_sources(value, members)
            if found:
                return found
    elif isinstance(node, list):
        for value in node:
            found = _missing_sources(value, members)
            if found:
                return found
    return None


def _read_bytes(entry: Any) -> bytes:
    """The bytes of a weights file (inside a package or beside the rdf.yaml)."""
    from bioimageio.spec.utils import download

    found = download(entry)
    return found.read_bytes() if hasattr(found, "read_bytes") else found.read()


def _onnx_bytes(entry: Any) -> bytes:
    """ONNX weights as one self-contained model, external data (``external_data``) included.

    A package's files may live only inside its zip, so the weights are put
    back into the model here, which also puts them into its identity for
    resume. Packages stay far below protobuf's 2 GB limit on one model.
    """
    from bioimageio.spec.utils import download

    model = download(entry)
    if getattr(entry, "external_data", None) is None:
        return model.read()
    try:
        import onnx
        from onnx.external_data_helper import load_external_data_for_model
    except ImportError:
        raise ModelError("ONNX weights with external data need the onnx package: "
                         "pip install onnx") from None
    data = download(entry.external_data)
    with tempfile.TemporaryDirectory(prefix="tilesegment-onnx-") as folder:
        (Path(folder) / data.original_file_name).write_bytes(data.read())
        proto = onnx.load_model_from_string(model.read())
        load_external_data_for_model(proto, folder)
        return proto.SerializeToString()


def _load_network(descr: Any, wanted: Optional[str], geometry: Geometry) -> tuple[nn.Module, str]:
    name = str(descr.name)
    available = [w for w in _WEIGHTS_ORDER if getattr(descr.weights, w, None) is not None]
    order = [wanted] if wanted else available
    for fmt in order:
        entry = getattr(descr.weights, fmt, None)
        if entry is None:
            continue
        try:
            if fmt == "torchscript":
                import io

                return torch.jit.load(io.BytesIO(_read_bytes(entry)), map_location="cpu").eval(), fmt
            if fmt == "onnx":
                from .onnx import OnnxModel

                return OnnxModel(_onnx_bytes(entry), geometry=geometry), fmt
            from bioimageio.core.backends.pytorch_backend import load_torch_model

            return load_torch_model(entry, load_state=True, devices=["cpu"]).eval(), fmt
        except ModelError:
            raise
        except ImportError as exc:
            raise ModelError(f"{name}: {fmt} weights need a package that is missing ({exc})") from None
        except Exception as exc:
            raise ModelError(f"{name}: cannot load its {fmt} weights ({cause(exc)})") from None
    raise ModelError(f"{name}: no usable weights (has {', '.join(available) or 'none'}; tilesegment "
                     f"runs {', '.join(_WEIGHTS_ORDER)})")


def check_test_tensors(model: BioimageioModel, rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Run the package's own test input through `model`; return the max abs difference.

    Raises
    ------
    ModelError
        If the output differs from the package's test output beyond `rtol`/`atol`.
    """
    x, expected = model.test_tensors
    with torch.inference_mode():
        got = model(torch.from_numpy(x)).numpy()
    if got.shape != expected.shape:
        raise ModelError(f"{model.name}: test output has shape {got.shape}, the package's "
                         f"{expected.shape}")
    diff = float(np.abs(got - expected).max())
    if not np.allclose(got, expected, rtol=rtol, atol=atol):
        raise ModelError(f"{model.name}: its test input does not reproduce its test output "
                         f"(max abs difference {diff:.3g})")
    return diff
