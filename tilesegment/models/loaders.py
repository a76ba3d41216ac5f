"""The built-in model loaders (`tilesegment.contracts.ModelLoader`), registered in `tilesegment.registry.model_loaders`.

`load_model` asks them lowest `priority` first; the first whose `can_load`
is true loads the spec. The order is what the specs need: a module is
itself; ``"demo"`` is ours; files go by kind (bioimage.io description or
package, ONNX, then any other file as a checkpoint or TorchScript); a
``package.module:factory`` name comes last, so that a file of that name
wins. A plug-in with a priority below 90 is asked before our file loaders.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..registry import model_loaders

__all__ = ["ModuleLoader", "DemoLoader", "BioimageioLoader", "OnnxLoader", "TorchFileLoader", "FactoryLoader"]

#: ``package.module:factory``: dotted module names, a colon, a callable's name.
_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def _text(spec: Any) -> Optional[str]:
    return os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else None


def _file(spec: Any) -> Optional[Path]:
    """The existing file `spec` names, or None (never raises: a loader's check must not)."""
    text = _text(spec)
    if not text:
        return None
    try:
        path = Path(text)
        return path if path.is_file() else None
    except (OSError, ValueError):  # a name the file system refuses (too long, a NUL byte)
        return None


class ModuleLoader:
    """A ``torch.nn.Module``: itself, in eval mode."""

    name, priority = "module", 0

    def can_load(self, spec: Any) -> bool:
        return isinstance(spec, nn.Module)

    def load(self, spec: nn.Module) -> nn.Module:
        return spec.eval()


class DemoLoader:
    """``"demo"``: the bundled H&E U-Net (docs/demo.md)."""

    name, priority = "demo", 10

    def can_load(self, spec: Any) -> bool:
        return _text(spec) == "demo"

    def load(self, spec: Any) -> nn.Module:
        from .load import DEMO_MODEL, _load_file

        return _load_file(DEMO_MODEL).eval()


class BioimageioLoader:
    """A bioimage.io ``rdf.yaml`` or package ``.zip`` (`tilesegment.models.bioimageio`)."""

    name, priority = "bioimageio", 20

    def can_load(self, spec: Any) -> bool:
        from .bioimageio import is_bioimageio

        path = _file(spec)
        return path is not None and is_bioimageio(path)

    def load(self, spec: Any) -> nn.Module:
        from .bioimageio import load_bioimageio

        return load_bioimageio(_file(spec))


class OnnxLoader:
    """An ``.onnx`` file, run through onnxruntime (`tilesegment.models.onnx`)."""

    name, priority = "onnx", 30

    def can_load(self, spec: Any) -> bool:
        path = _file(spec)
        return path is not None and path.suffix.lower() == ".onnx"

    def load(self, spec: Any) -> nn.Module:
        from .onnx import OnnxModel

        return OnnxModel(_file(spec)).eval()


class TorchFileLoader:
    """Any other file: a tilesegment checkpoint or TorchScript; other files are refused with why."""

    name, priority = "torch-file", 90

    def can_load(self, spec: Any) -> bool:
        return _file(spec) is not None

    def load(self, spec: Any) -> nn.Module:
        from .load import _load_file

        return _load_file(_file(spec)).eval()


class FactoryLoader:
    """``"package.module:factory"``: imports the module and calls the factory (runs its code)."""

    name, priority = "factory", 100

    def can_load(self, spec: Any) -> bool:
        text = _text(spec)
        return text is not None and _FACTORY.fullmatch(text) is not None

    def load(self, spec: Any) -> nn.Module:
        from .load import _load_factory

        return _load_factory(_text(spec)).eval()


for _loader in (ModuleLoader(), DemoLoader(), BioimageioLoader(), OnnxLoader(), TorchFileLoader(), FactoryLoader()):
    model_loaders.register(_loader.name, _loader)
