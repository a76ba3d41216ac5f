"""Growing seeds into whole objects: exact Euclidean growth by at most k pixels, chunk by chunk.

A network with an interior class and a boundary class gives seeds that do
not touch (the U-Net paper's answer to touching cells); growing each seed by
at most `k` pixels into the boundary gives whole objects. The rule, for each
pixel that may be grown into and is not part of an object:

- it takes the id of the object whose nearest pixel is closest to it, when
  that distance is at most `k`;
- of objects at the same distance, the smaller id wins;
- farther than `k` from every object, it stays 0.

Distances are Euclidean, ``sqrt(sum((d_a * s_a) ** 2))`` over the axes, with
`s_a` the spacing of axis `a` relative to the finest one (1 everywhere when
the pixel size is unknown or isotropic), so `k` counts pixels of the finest
axis. Squared distances are computed in float64 in axis order from one table
of offsets, so ties are decided the same way in every chunk.

The value at a pixel depends on nothing farther than `k`, so `Grow` is a
`tilesegment.contracts.ChunkStep` with halo ``ceil(k)``: `map_overlap` gives
the whole-image result for any chunking, in memory O((chunk + 2 ceil(k))^ndim)
per task. This is not `skimage.segmentation.expand_labels`: that one breaks
ties in an undefined order, which chunking would expose.

The step reads one map in which the pixels to grow into are marked with
`mark` (the largest value of its dtype), as the write pass of `label_objects`
leaves them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numba
import numpy as np

from ..contracts import Region
from ..errors import UsageError

__all__ = ["Grow", "offsets", "relative_spacing"]


def relative_spacing(pixel_size: Optional[Sequence[float]], ndim: int) -> tuple[float, ...]:
    """Spacing per axis relative to the finest (all 1.0 when unknown).

    >>> relative_spacing((2.0, 0.5, 0.5), 3)
    (4.0, 1.0, 1.0)
    """
    if pixel_size is None:
        return (1.0,) * ndim
    size = tuple(float(s) for s in pixel_size)
    if len(size) != ndim or min(size) <= 0 or not all(math.isfinite(s) for s in size):
        raise UsageError(f"spacing {pixel_size!r} must be {ndim} positive numbers, one per axis")
    finest = min(size)
    return tuple(s / finest for s in size)


def offsets(k: float, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Every non-zero integer offset within distance `k`, nearest first: (M, 3) offsets and their
    squared distances (a 2-D spacing gives offsets with no z step)."""
    spacing = tuple(float(s) for s in spacing)
    reach = [int(math.floor(k / s)) for s in spacing]
    axes = [np.arange(-r, r + 1) for r in reach]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(spacing)).astype(np.int64)
    d2 = np.zeros(len(grid), np.float64)
    for a, s in enumerate(spacing):  # in axis order, as the docs (and any reference) say
        d2 += (grid[:, a] * s) ** 2
    keep = (d2 <= float(k) * float(k)) & (grid != 0).any(axis=1)
    grid, d2 = grid[keep], d2[keep]
    order = np.argsort(d2, kind="stable")
    grid, d2 = grid[order], d2[order]
    if len(spacing) == 2:
        grid = np.concatenate([np.zeros((len(grid), 1), np.int64), grid], axis=1)
    return np.ascontiguousarray(grid), d2


@numba.njit(cache=True, nogil=True)
def _grow(block, z0, z1, y0, y1, x0, x1, offs, d2, mark, out):  # pragma: no cover - compiled
    nz, ny, nx = block.shape
    for z in range(z0, z1):
        for y in range(y0, y1):
            for x in range(x0, x1):
                v = block[z, y, x]
                if v != mark:
                    out[z - z0, y - y0, x - x0] = v
                    continue
                best = v - v  # 0 in the block's dtype
                best_d = np.inf
                for i in range(offs.shape[0]):
                    if d2[i] > best_d:  # offsets are sorted: nothing nearer is left
                        break
                    qz, qy, qx = z + offs[i, 0], y + offs[i, 1], x + offs[i, 2]
                    if qz < 0 or qy < 0 or qx < 0 or qz >= nz or qy >= ny or qx >= nx:
                        continue
                    w = block[qz, qy, qx]
                    if w == 0 or w == mark:
                        continue
                    if best == 0 or w < best:  # the first found sets the distance; ties: smaller id
                        best = w
                        best_d = d2[i]
                out[z - z0, y - y0, x - x0] = best
    return out


@dataclass(frozen=True)
class Grow:
    """The `ChunkStep` that grows numbered objects into marked pixels by at most `k`.

    Parameters
    ----------
    k : float
        Largest distance grown, in pixels of the finest axis (> 0).
    dtype : numpy.dtype
        The numbered map's unsigned dtype; its largest value marks the
        pixels that may be grown into.
    spacing : tuple of float, optional
        Pixel size per axis (any unit; only ratios matter). Default: 1.
    """

    k: float
    dtype: np.dtype = np.dtype(np.uint32)
    spacing: Optional[tuple[float, ...]] = None
    _table: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.k, (int, float, np.integer, np.floating)) and math.isfinite(self.k) and self.k > 0):
            raise UsageError(f"grow {self.k!r} must be a positive number of pixels, e.g. 3")
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.dtype.kind != "u":
            raise UsageError(f"grow needs an unsigned id map, not {self.dtype}")

    @property
    def name(self) -> str:
        return f"grow{self.k:g}"

    @property
    def halo(self) -> int:
        return int(math.ceil(self.k))

    @property
    def mark(self) -> int:
        """The value of pixels that may be grown into."""
        return int(np.iinfo(self.dtype).max)

    def _offsets(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        if ndim not in self._table:  # computed once per process (a worker gets its own copy)
            spacing = relative_spacing(self.spacing, ndim)
            self._table[ndim] = offsets(float(self.k), spacing)
        return self._table[ndim]

    def apply(self, block: np.ndarray, core: Region) -> np.ndarray:
        """The grown ids of ``block[core]``; marks farther than `k` from every object become 0."""
        ndim = block.ndim
        if ndim not in (2, 3):
            raise UsageError(f"grow works on 2-D or 3-D maps, not {ndim}-D")
        offs, d2 = self._offsets(ndim)
        block3 = np.ascontiguousarray(block, self.dtype).reshape((1,) * (3 - ndim) + block.shape)
        core3 = (slice(0, 1),) * (3 - ndim) + tuple(core)
        out = np.empty(tuple(c.stop - c.start for c in core3), self.dtype)
        _grow(block3, *(v for c in core3 for v in (c.start, c.stop)), offs, d2, self.dtype.type(self.mark), out)
        return out.reshape(tuple(c.stop - c.start for c in core))
