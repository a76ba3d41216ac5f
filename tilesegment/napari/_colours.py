"""Objects coloured by a measurement of their table (a Labels layer's ``features``)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["numeric_columns", "object_colours", "colour_by"]

_NOT_MEASUREMENTS = {"index", "id", "class"}


def numeric_columns(features: Any) -> list[str]:
    """The numeric measurements of an object table, in its order (not ids or class codes)."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    if features is None or len(getattr(features, "columns", ())) == 0:
        return []
    # pandas' dtype checks, not numpy's: pandas 3 string columns have a dtype numpy cannot read
    return [c for c in features.columns if c not in _NOT_MEASUREMENTS
            and is_numeric_dtype(features[c].dtype) and not is_bool_dtype(features[c].dtype)]


def object_colours(ids: np.ndarray, values: np.ndarray, colormap: str = "viridis") -> dict:
    """Label id -> RGBA (0..1) along `colormap`, the values scaled between their 1st and 99th
    percentiles (so a few huge objects do not wash the rest out); 0 and unknown ids transparent.

    >>> c = object_colours(np.array([1, 2]), np.array([0.0, 10.0]))
    >>> c[1][:3] != c[2][:3], c[0], c[None]
    (True, (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0))
    """
    from napari.utils.colormaps import ensure_colormap

    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    lo, hi = np.percentile(values[finite], [1, 99]) if finite.any() else (0.0, 1.0)
    scaled = np.clip((values - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    rgba = ensure_colormap(colormap).map(np.where(finite, scaled, 0))
    rgba[~finite, 3] = 0
    colours: dict = {int(i): tuple(float(v) for v in c) for i, c in zip(ids, rgba)}
    colours[0] = colours[None] = (0.0, 0.0, 0.0, 0.0)
    return colours


def colour_by(layer: Any, column: str, colormap: str = "viridis") -> None:
    """Colour the objects of a Labels `layer` by `column` of its features (its object table)."""
    from napari.utils.colormaps import DirectLabelColormap

    from ..errors import UsageError

    features = layer.features
    if column not in features:
        raise UsageError(f"{layer.name!r} has no column {column!r}; it has {', '.join(map(str, features.columns))}")
    ids = features["index"] if "index" in features else features["id"]
    layer.colormap = DirectLabelColormap(color_dict=object_colours(ids.to_numpy(), features[column].to_numpy(),
                                                                   colormap))
