"""Save and load models: our checkpoint, TorchScript, ONNX, or ``"package.module:factory"``.

Which loader takes which spec is in `tilesegment.models.loaders`.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from ..errors import ModelError, cause
from .unet import UNet

__all__ = ["save_model", "load_model", "ModelSpec"]

ModelSpec = Union[nn.Module, str, os.PathLike]
_FORMAT = "tilesegment.checkpoint"
_VERSION = 1
_ARCHITECTURES = {"UNet": UNet}
#: The bundled demo model; see tilesegment/models/train_demo.py and docs/demo.md.
DEMO_MODEL = Path(__file__).with_name("demo_unet.pt")


def save_model(model: nn.Module, path: Union[str, os.PathLike], *, format: str = "checkpoint",
               **metadata: Any) -> Path:
    """Write `model` as a tilesegment checkpoint (architecture, weights, normalization) or ONNX.

    Parameters
    ----------
    model : UNet or torch.nn.Module
        A built-in network (its ``config`` rebuilds it); for ``format="onnx"``
        any module whose geometry `Geometry.of` finds.
    path : str or path-like
        Destination file, conventionally ``*.pt`` (checkpoint) or ``*.onnx``.
    format : {"checkpoint", "onnx"}
        ``"onnx"`` exports with dynamic batch, height and width and stores
        the geometry and normalization in the file's metadata, so
        ``load_model("net.onnx")`` runs it through onnxruntime with no
        probing (needs the ``onnx`` extra: ``pip install -e ".[onnx]"``; see
        `tilesegment.models.onnx.export_onnx` for the exporter options).
    **metadata
        Extra JSON-like facts to keep with the weights (training data, scores).

    Returns
    -------
    pathlib.Path
        The written file.
    """
    if format == "onnx":
        from .onnx import export_onnx

        return export_onnx(model, path, **metadata)
    if format != "checkpoint":
        raise ModelError(f"save_model format {format!r} is unknown; use 'checkpoint' or 'onnx'")
    arch = type(model).__name__
    if arch not in _ARCHITECTURES or not hasattr(model, "config"):
        raise ModelError(
            f"save_model stores built-in architectures ({', '.join(_ARCHITECTURES)}), got {arch}; "
            "save other models with torch.jit.save and load the .pt file"
        )
    path = Path(path)
    torch.save(
        {
            "format": _FORMAT,
            "version": _VERSION,
            "architecture": arch,
            "config": dict(model.config),
            "normalization": model.normalization,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "metadata": metadata,
        },
        path,
    )
    return path


def load_model(spec: ModelSpec) -> nn.Module:
    """Return a ready-to-run module (eval mode) from `spec`.

    Each model loader of `tilesegment.registry.model_loaders` is asked in
    turn (`tilesegment.models.loaders` has ours; other packages add theirs
    through the ``tilesegment.models`` entry point group), and the first
    that can load `spec` does.

    Parameters
    ----------
    spec : nn.Module, path or str
        A module (returned as is); ``"demo"``, the bundled H&E model
        (background, tissue, nuclei); a tilesegment checkpoint written by
        `save_model`; a TorchScript file; an ONNX file (``*.onnx``, run
        through onnxruntime, see `tilesegment.models.onnx.OnnxModel`); a
        bioimage.io model (``rdf.yaml`` or package ``.zip``; loading it runs
        its architecture code, see `tilesegment.models.bioimageio`); or
        ``"package.module:factory"``, a callable that returns a module.

    Raises
    ------
    ModelError
        If the file is missing or is none of the above; the message says which.
    """
    from .. import registry

    loader = registry.model_loaders.first(lambda entry: entry.can_load(spec))
    if loader is not None:
        return loader.load(spec)
    text = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else spec
    raise ModelError(
        f"model {text!r} not found; pass a checkpoint path (*.pt), an ONNX file (*.onnx), a "
        "bioimage.io rdf.yaml or package .zip, or 'package.module:factory'"
    )


def _load_file(path: Path) -> nn.Module:
    if not zipfile.is_zipfile(path):
        raise ModelError(
            f"model file {str(path)!r} is not a PyTorch checkpoint or TorchScript file; "
            "save one with ts.save_model(model, path) or torch.jit.save"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            is_script = any(name.endswith("constants.pkl") for name in archive.namelist())
            # torch reads tensors without checking their CRC: damaged weights would load and
            # give NaN or wrong labels. Checking costs one read of the file (~1 s a GB).
            damaged = archive.testzip()
    except Exception as exc:  # zipfile fails in kind on a damaged directory (BadZipFile, UnicodeDecodeError...)
        raise ModelError(f"cannot read model file {str(path)!r}: {cause(exc)}") from None
    if damaged is not None:
        raise ModelError(f"model file {str(path)!r} is damaged: its part {damaged!r} fails its checksum (CRC); "
                         "copy or save the model again")
    if is_script:
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # TorchScript's own unpickler: no Python code runs, but it fails in kind
            raise ModelError(f"model file {str(path)!r} looks like TorchScript but cannot be loaded "
                             f"({cause(exc)}); the file is damaged or not TorchScript") from None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses pickled classes and callables before running any: a whole module
        # saved with torch.save(model), or a file made to run code when it is loaded.
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({refused.group(1)})" if refused else ""
        raise ModelError(
            f"model file {str(path)!r} holds pickled Python objects{what} that only running code "
            "could load, so it was refused unread; if it is a whole pickled module (torch.save(model)), "
            "save it with ts.save_model(model, path) or torch.jit.save, or load it yourself and pass the "
            "module (Python) or a 'package.module:factory' (CLI)"
        ) from None
    except Exception as exc:
        raise ModelError(f"cannot read model file {str(path)!r}: {cause(exc)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise ModelError(
            f"model file {str(path)!r} is a PyTorch file but not a tilesegment checkpoint; "
            "write one with ts.save_model, or pass 'package.module:factory'"
        )
    arch = _ARCHITECTURES.get(ckpt.get("architecture")) if isinstance(ckpt.get("architecture"), str) else None
    if arch is None:
        raise ModelError(f"checkpoint {str(path)!r} names architecture {ckpt.get('architecture')!r}, which is "
                         f"unknown (known: {', '.join(_ARCHITECTURES)}); the file is damaged or from a newer "
                         "tilesegment")
    try:
        model = arch(**ckpt["config"], normalization=ckpt.get("normalization"))
    except Exception as exc:
        raise ModelError(f"checkpoint {str(path)!r} has an invalid config for {ckpt['architecture']} "
                         f"({cause(exc)}); the file is damaged") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except Exception as exc:
        raise ModelError(f"checkpoint {str(path)!r}: its weights do not fit its {ckpt['architecture']} "
                         f"config ({_state_mismatch(exc)}); the file is damaged") from None
    model.metadata = ckpt.get("metadata", {})
    return model


def _state_mismatch(exc: Exception, limit: int = 300) -> str:
    """torch's many-line load_state_dict message as one clause: the keys and shapes that differ."""
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    text = " ".join(lines) or cause(exc)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_factory(text: str) -> nn.Module:
    module_name, _, attr = text.partition(":")
    try:
        module = _import_from_here(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"cannot import model factory {text!r}: {exc}") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {text!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_from_here(name: str):
    """Import `name`, finding modules in the working folder too, as ``python -m`` would
    (the ``tilesegment`` console script does not put the working folder on ``sys.path``)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != name.split(".")[0] or here in sys.path:
            raise
    sys.path.insert(0, here)
    return importlib.import_module(name)
