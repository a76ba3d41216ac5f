"""Arrays in memory (numpy, zarr, dask, anything array-like): the catch-all reader, asked last."""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from ...errors import InputError
from ...registry import readers
from ..sources import ImageSource, default_axes

__all__ = ["ArrayReader"]


class ArrayReader:
    """An array (or anything `numpy.asarray` takes) read as it is; axes from `default_axes` unless given."""

    name = "array"
    priority = 100
    formats = "numpy, zarr and dask arrays in memory"

    def can_open(self, target: Any) -> bool:
        """Whether `target` is no path or URL: everything else is tried as an array."""
        return not isinstance(target, (str, bytes, os.PathLike))

    def open(self, target: Any, *, axes: Optional[str], level: int, series: int,
             storage_options: Optional[dict], ndim: int) -> ImageSource:
        """`target` as a one-level image; a level other than 0 is an error."""
        if not hasattr(target, "shape") or not hasattr(target, "dtype"):
            try:
                target = np.asarray(target)
            except Exception as exc:
                raise InputError(f"cannot use a {type(target).__name__} as an image: {exc}") from exc
        if level != 0:
            raise InputError(f"level {level} is out of range: an array has only level 0")
        shape = tuple(target.shape)
        return ImageSource(target, axes or default_axes(shape, ndim), name=f"array {shape}")


readers.register(ArrayReader.name, ArrayReader())
