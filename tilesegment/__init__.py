"""tilesegment: exact overlap-tile segmentation of gigapixel images into OME-Zarr."""

from .api import Job, RunStats, prepare, segment
from .errors import (
    InputError,
    InvalidTileSize,
    ModelError,
    ModelOutputError,
    OutputExistsError,
    TileReadError,
    TileSegmentError,
    UsageError,
)
from .geometry import Geometry
from .io.sources import ImageSource, open_image
from .models import UNet, load_model, save_model
from .objects import Objects, label_objects
from .plan import Block, Tile, TilePlan
from .stitch import Stitcher
from .tiler import Batch, Tiler

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Block",
    "Geometry",
    "ImageSource",
    "InputError",
    "Job",
    "InvalidTileSize",
    "ModelError",
    "ModelOutputError",
    "Objects",
    "OutputExistsError",
    "RunStats",
    "Stitcher",
    "Tile",
    "TilePlan",
    "TileReadError",
    "Tiler",
    "TileSegmentError",
    "UNet",
    "UsageError",
    "label_objects",
    "load_model",
    "open_image",
    "prepare",
    "save_model",
    "segment",
]
