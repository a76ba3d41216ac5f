"""Gather mirror-padded, normalized network inputs straight from a source region.

Normalization is ``pixel * scale + offset`` rounded to float32 once (the
product and the sum in float64, both exact for 8- and 16-bit pixels and
float32 factors), as the fused multiply-add with which an executor
normalizes raw batches on its device (`tilesegment.executor.Executor`,
``input_affine``): a tile's input is the same bit for bit on either side.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numba
import numpy as np

from ..errors import UsageError

__all__ = ["PADDING_MODES", "pad_indices", "normalization_affine", "gather", "gather_raw", "gather_nd"]

#: Padding modes, named as in ``numpy.pad``.
PADDING_MODES = ("reflect", "symmetric", "edge", "constant")


def pad_indices(start: int, length: int, size: int, mode: str = "reflect") -> np.ndarray:
    """Source index of each of `length` positions from `start` along an axis of `size`.

    Positions outside ``[0, size)`` map like ``numpy.pad(mode=mode)``, repeated as
    often as needed, so halos larger than the image work. ``constant`` maps
    them to -1 (filled with zero).

    Examples
    --------
    >>> pad_indices(-3, 9, 4).tolist()
    [3, 2, 1, 0, 1, 2, 3, 2, 1]
    """
    i = np.arange(start, start + length, dtype=np.int64)
    if mode == "reflect":
        if size == 1:
            return np.zeros_like(i)
        period = 2 * (size - 1)
        i = np.mod(i, period)
        return np.where(i >= size, period - i, i)
    if mode == "symmetric":
        i = np.mod(i, 2 * size)
        return np.where(i >= size, 2 * size - 1 - i, i)
    if mode == "edge":
        return np.clip(i, 0, size - 1)
    if mode == "constant":
        return np.where((i >= 0) & (i < size), i, -1)
    raise UsageError(f"padding {mode!r} is unknown; use one of {', '.join(PADDING_MODES)}")


def normalization_affine(
    dtype: np.dtype,
    channels: int,
    normalization: Optional[tuple[Sequence[float], Sequence[float]]] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(scale, offset)`` so that ``input = pixel * scale + offset``.

    Integers are divided by their dtype's maximum (uint8 / 255, uint16 / 65535);
    floats pass through. A model's ``(mean, std)`` is folded in afterwards.
    """
    dtype = np.dtype(dtype)
    top = float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0
    scale = np.full(channels, 1.0 / top, dtype=np.float64)
    offset = np.zeros(channels, dtype=np.float64)
    if normalization is not None:
        mean, std = (np.asarray(v, dtype=np.float64) for v in normalization)
        scale, offset = scale / std, (offset - mean) / std
    return scale.astype(np.float32), offset.astype(np.float32)


@numba.njit(cache=True, nogil=True)
def _gather_chw(region, iy, ix, scale, offset, normalize, out):  # pragma: no cover - compiled
    # Row by row, channel by channel: each output row is written contiguously
    # (twice as fast as the pixel-major order for RGB tiles).
    channels = out.shape[0]
    for i in range(iy.shape[0]):
        y = iy[i]
        for c in range(channels):
            sc, of = np.float64(scale[c]), np.float64(offset[c])
            fill = of if normalize else 0
            if y < 0:
                out[c, i, :] = fill
                continue
            row = region[y]
            for j in range(ix.shape[0]):
                x = ix[j]
                if x < 0:
                    out[c, i, j] = fill
                elif normalize:
                    out[c, i, j] = np.float32(np.float64(row[x, c]) * sc + of)
                else:
                    out[c, i, j] = row[x, c]


@numba.njit(cache=True, nogil=True)
def _gather_hwc(region, iy, ix, scale, offset, normalize, out):  # pragma: no cover - compiled
    # Channels-last output: pixel by pixel, its channels side by side, as the
    # source region stores them; both sides are read and written in order.
    channels = out.shape[2]
    for i in range(iy.shape[0]):
        y = iy[i]
        for j in range(ix.shape[0]):
            x = ix[j]
            for c in range(channels):
                of = np.float64(offset[c])
                if y < 0 or x < 0:
                    out[i, j, c] = of if normalize else 0
                elif normalize:
                    out[i, j, c] = np.float32(np.float64(region[y, x, c]) * np.float64(scale[c]) + of)
                else:
                    out[i, j, c] = region[y, x, c]


def _gather_plane(region, iy, ix, scale, offset, normalize, out) -> None:
    hwc = out.transpose(1, 2, 0)
    if hwc.flags.c_contiguous and out.shape[0] > 1:  # a channels-last batch
        _gather_hwc(region, iy, ix, scale, offset, normalize, hwc)
    else:
        _gather_chw(region, iy, ix, scale, offset, normalize, out)


def gather_nd(
    region: np.ndarray,
    indices: Sequence[np.ndarray],
    scale: np.ndarray,
    offset: np.ndarray,
    out: np.ndarray,
    normalize: bool = True,
) -> np.ndarray:
    """Fill ``out[c, i, ..., j] = region[indices[0][i], ..., indices[-1][j], c] * scale[c] + offset[c]``.

    The N-d form of `gather` (one index array per spatial axis of `region`,
    which is ``(*spatial, C)``). Planes along the axes before the last two
    go one by one through the 2-d kernel: a plane is a few hundred thousand
    pixels, so the loop costs nothing next to the copy.
    """
    if region.dtype == np.bool_:
        region = region.view(np.uint8)
    *lead, iy, ix = indices
    if not lead:
        _gather_plane(region, iy, ix, scale, offset, normalize, out)
        return out
    fill = offset.reshape(-1, 1, 1) if normalize else 0
    for position in itertools.product(*(range(len(i)) for i in lead)):
        source = tuple(int(i[p]) for i, p in zip(lead, position))
        plane = out[(slice(None), *position)]
        if min(source) < 0:  # a plane outside the image, padding="constant"
            plane[...] = fill
        else:
            _gather_plane(region[source], iy, ix, scale, offset, normalize, plane)
    return out


def gather(
    region: np.ndarray,
    iy: np.ndarray,
    ix: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    out: np.ndarray,
) -> np.ndarray:
    """Fill ``out[c, i, j] = region[iy[i], ix[j], c] * scale[c] + offset[c]``.

    `region` is ``(Y, X, C)`` in any dtype and strides; `out` is a float32
    ``(C, len(iy), len(ix))`` array, C-contiguous or a channels-last view
    (``hwc.transpose(2, 0, 1)``). Index -1 means "outside" (zero before
    normalization). One pass converts, mirrors and normalizes.
    """
    return gather_nd(region, (iy, ix), scale, offset, out)


def gather_raw(region: np.ndarray, iy: np.ndarray, ix: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Fill ``out[c, i, j] = region[iy[i], ix[j], c]`` in the source dtype (index -1: zero).

    The unnormalized twin of `gather`, for consumers that convert and
    normalize on the device: a uint8 batch is a quarter of the float32 one
    to fill, pin and copy.
    """
    unit = np.zeros(out.shape[0], np.float32)
    return gather_nd(region, (iy, ix), unit, unit, out, normalize=False)
