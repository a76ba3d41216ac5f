"""Tissue detection: which parts of a slide are worth computing."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

__all__ = ["detect_tissue", "load_mask", "max_filter", "otsu_threshold", "MaskLike"]

MaskLike = Union[None, str, os.PathLike, np.ndarray, Any]


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of `values` (maximises the between-class variance)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _dilate_axis(mask: np.ndarray, radius: int, axis: int) -> np.ndarray:
    # A window sum from a cumulative sum: O(1) per pixel whatever the radius.
    padded = np.pad(mask, [(radius, radius) if a == axis else (0, 0) for a in range(2)], mode="edge")
    csum = np.cumsum(padded, axis=axis, dtype=np.int32)
    csum = np.concatenate([np.zeros_like(csum.take([0], axis=axis)), csum], axis=axis)
    n = mask.shape[axis]
    return (csum.take(np.arange(2 * radius + 1, n + 2 * radius + 1), axis=axis)
            - csum.take(np.arange(n), axis=axis)) > 0


def _morph(mask: np.ndarray, radius: int, dilate: bool) -> np.ndarray:
    """Binary dilation (or erosion) by a ``(2 radius + 1)`` square, edges replicated."""
    if radius <= 0:
        return mask
    out = mask if dilate else ~mask
    out = _dilate_axis(_dilate_axis(out, radius, 0), radius, 1)
    return out if dilate else ~out


def max_filter(t: torch.Tensor, radius: int) -> torch.Tensor:
    """Square max filter of a (1, 1, Y, X) tensor, edges replicated; separable, so
    O(radius) per pixel rather than O(radius^2)."""
    k = 2 * radius + 1
    t = F.max_pool2d(F.pad(t, (radius, radius, 0, 0), mode="replicate"), (1, k), stride=1)
    return F.max_pool2d(F.pad(t, (0, 0, radius, radius), mode="replicate"), (k, 1), stride=1)


def detect_tissue(
    source, max_edge: Optional[int] = None, margin_um: float = 16.0, resolution_um: float = 8.0
) -> np.ndarray:
    """Low-resolution boolean mask of tissue in `source` (True = compute there).

    RGB images (bright-field): Otsu threshold on saturation, which separates
    stained tissue from white-grey glass. Other images (fluorescence):
    Otsu on mean intensity, bright = tissue. Specks smaller than about 3
    mask pixels are removed (opening) and the mask is dilated by
    `margin_um` (or 2 % of the mask when the pixel size is unknown), so faint
    tissue edges are kept rather than skipped.

    The mask has about `resolution_um` per pixel (1/16 of the image's pixels
    per side when the pixel size is unknown), at most 2048 and at least 256
    pixels a side, unless `max_edge` says otherwise. It is read from the
    smallest pyramid level or thumbnail that is fine enough, so detection
    costs what that picture costs, not what the slide costs.
    """
    if max_edge is None:
        per_pixel = source.pixel_size[1] / resolution_um if source.pixel_size else 1 / 16
        max_edge = int(min(2048, max(256, max(source.shape) * per_pixel)))
    picture = source.overview(max_edge).astype(np.float32)
    if picture.shape[-1] >= 3:
        rgb = picture[..., :3]
        top, low = rgb.max(-1), rgb.min(-1)
        signal = (top - low) / np.maximum(top, 1e-6)
    else:
        signal = picture.mean(-1)
    threshold = otsu_threshold(signal)
    mask = signal > threshold
    mask = _morph(_morph(mask, 1, dilate=False), 1, dilate=True)
    scale = source.shape[1] / mask.shape[1]
    if source.pixel_size is not None:
        radius = int(np.ceil(margin_um / (source.pixel_size[1] * scale)))
    else:
        radius = int(np.ceil(0.02 * max(mask.shape)))
    return _morph(mask, radius, dilate=True)


def load_mask(mask: MaskLike, source) -> np.ndarray | None:
    """The tissue mask asked for: None, ``"auto"``, a boolean array, or an image file.

    Any resolution works as long as the aspect ratio matches the image's.
    """
    if mask is None:
        return None
    if isinstance(mask, str) and mask == "auto":
        return detect_tissue(source)
    if isinstance(mask, (str, os.PathLike)):
        from .io.sources import open_image

        other = open_image(mask)
        try:
            array = other.read(0, other.shape[0], 0, other.shape[1])[..., 0] > 0
        finally:
            other.close()
    else:
        array = np.asarray(mask)
        if array.ndim != 2:
            raise InputError(f"tissue_mask must be 2-d (Y, X); got shape {array.shape}")
        array = array.astype(bool)
    (ny, nx), (my, mx) = source.shape, array.shape
    if abs(ny / my - nx / mx) > 0.02 * max(ny / my, nx / mx) + 1.0 / min(my, mx) * max(ny / my, nx / mx):
        raise InputError(
            f"tissue_mask of shape {array.shape} does not have the aspect of the image {source.shape}; "
            "pass a mask of the whole image at any resolution"
        )
    return array
