"""Numba kernels that crop a network output to its tile and reduce it in one pass.

Each returns whether every value it read was finite: checking in the same
pass costs nothing, where a separate np.isfinite pass over a strided window
allocates and copies as much again. ``v - v == 0`` is False exactly for NaN
and +-Inf, and always True for integers.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numba
import numpy as np

__all__ = ["crop_copy", "crop_labels", "crop_probabilities", "crop_nd"]


def crop_nd(kernel: Callable, out: np.ndarray, crop: Sequence[int], size: Sequence[int],
            dest: np.ndarray, offset: Sequence[int]) -> bool:
    """Run a 2-d crop `kernel` over every plane of an N-d tile; return whether all was finite.

    `out` is ``(K, *spatial)``; the window ``crop + [0, size)`` of it goes to
    ``offset + [0, size)`` of `dest` (``(*spatial)`` or ``(K, *spatial)``).
    Planes along the axes before the last two go one by one: each is large
    enough that the loop costs nothing next to the kernel.
    """
    *lead_crop, cy, cx = crop
    *lead_size, h, w = size
    *lead_offset, dy, dx = offset
    if not lead_size:
        return kernel(out, cy, cx, h, w, dest, dy, dx)
    finite = True
    for p in itertools.product(*map(range, lead_size)):
        plane = out[(slice(None), *(c + q for c, q in zip(lead_crop, p)))]
        target = dest[(Ellipsis, *(o + q for o, q in zip(lead_offset, p)), slice(None), slice(None))]
        finite &= bool(kernel(plane, cy, cx, h, w, target, dy, dx))
    return finite


@numba.njit(cache=True, nogil=True)
def crop_copy(out, cy, cx, h, w, dest, dy, dx):  # pragma: no cover - compiled
    finite = True
    for k in range(out.shape[0]):
        for i in range(h):
            for j in range(w):
                v = out[k, cy + i, cx + j]
                finite &= (v - v) == 0
                dest[k, dy + i, dx + j] = v
    return finite


@numba.njit(cache=True, nogil=True)
def crop_labels(out, cy, cx, h, w, dest, dy, dx):  # pragma: no cover - compiled
    classes = out.shape[0]
    finite = True
    for i in range(h):
        for j in range(w):
            best, arg = out[0, cy + i, cx + j], 0
            finite &= (best - best) == 0
            if classes == 1:
                dest[dy + i, dx + j] = 1 if best > 0 else 0
                continue
            for k in range(1, classes):
                v = out[k, cy + i, cx + j]
                finite &= (v - v) == 0
                if v > best:  # first maximum wins, as numpy.argmax
                    best, arg = v, k
            dest[dy + i, dx + j] = arg
    return finite


@numba.njit(cache=True, nogil=True)
def crop_probabilities(out, cy, cx, h, w, dest, dy, dx):  # pragma: no cover - compiled
    classes = out.shape[0]
    finite = True
    for i in range(h):
        for j in range(w):
            if classes == 1:
                v = out[0, cy + i, cx + j]
                finite &= (v - v) == 0
                p = 1.0 / (1.0 + math.exp(-float(v)))
                dest[0, dy + i, dx + j] = np.uint8(math.floor(p * 255.0 + 0.5))
                continue
            top = out[0, cy + i, cx + j]
            for k in range(classes):
                v = out[k, cy + i, cx + j]
                finite &= (v - v) == 0
                top = max(top, v)
            total = 0.0
            for k in range(classes):
                total += math.exp(float(out[k, cy + i, cx + j] - top))
            for k in range(classes):
                p = math.exp(float(out[k, cy + i, cx + j] - top)) / total
                dest[k, dy + i, dx + j] = np.uint8(math.floor(p * 255.0 + 0.5))
    return finite
