"""tilesegment: exact overlap-tile segmentation of gigapixel images into OME-Zarr."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    Cancelled,
    InputError,
    InvalidTileSize,
    ModelError,
    ModelOutputError,
    OutputBusyError,
    OutputExistsError,
    StaleLockWarning,
    TileReadError,
    TileSegmentError,
    UsageError,
)

__version__ = "0.1.0"

#: Public name -> the module that defines it. Modules load on first use, so that
#: ``import tilesegment`` and ``tilesegment --help`` do not pay for torch, numba
#: and zarr (seconds) before they are needed.
_LAZY = {
    "Job": "api",
    "exact_fp32": "process",
    "cudnn_autotune": "process",
    "prepare": "api",
    "segment": "api",
    "RunStats": "report",
    "Reporter": "contracts",
    "Geometry": "geometry",
    "ImageSource": "io.sources",
    "open_image": "io.sources",
    "Output": "io.output",
    "UNet": "models",
    "PlaneWise": "models",
    "load_model": "models",
    "save_model": "models",
    "Block": "plan",
    "Tile": "plan",
    "TilePlan": "plan",
    "Objects": "objects",
    "label_objects": "objects",
    "Stitcher": "stitch",
    "Batch": "tiler",
    "Tiler": "tiler",
}

__all__ = sorted([
    *_LAZY,
    "Cancelled",
    "InputError",
    "InvalidTileSize",
    "ModelError",
    "ModelOutputError",
    "OutputBusyError",
    "OutputExistsError",
    "StaleLockWarning",
    "TileReadError",
    "TileSegmentError",
    "UsageError",
])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tilesegment' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if TYPE_CHECKING:  # what static checkers and IDEs see
    from .api import Job, prepare, segment
    from .process import cudnn_autotune, exact_fp32
    from .contracts import Reporter
    from .geometry import Geometry
    from .io.output import Output
    from .io.sources import ImageSource, open_image
    from .models import PlaneWise, UNet, load_model, save_model
    from .objects import Objects, label_objects
    from .plan import Block, Tile, TilePlan
    from .report import RunStats
    from .stitch import Stitcher
    from .tiler import Batch, Tiler
