"""numpy slicing for the readers whose library reads regions, not arrays (OpenSlide, wsidicom, libCZI)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["RegionReads"]


class RegionReads:
    """Base of a read-only array-like over ``(*stack, Y, X[, S])`` whose pixels a library reads
    one plane's region at a time: numpy basic slicing (steps, integer indices, a channel index)
    on top of `_read`.

    A subclass sets ``shape``, ``dtype`` and ``chunks`` (the grid `ImageSource` reads in), and
    ``stack``, the number of leading axes read plane by plane (0 for a slide).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    stack = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _read(self, plane: tuple[int, ...], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` (a non-empty region) of the plane at `plane` (one index per
        stack axis), shaped ``(y1 - y0, x1 - x0, *shape[stack + 2:])``."""
        raise NotImplementedError

    def __getitem__(self, index: Any) -> np.ndarray:
        if not isinstance(index, tuple):
            index = (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        k = self.stack
        planes = [range(n)[s] if isinstance(s, slice) else [range(n)[s]] for s, n in zip(index[:k], self.shape)]
        (y0, y1, ys), (x0, x1, xs) = (s.indices(n) for s, n in zip(index[k:k + 2], self.shape[k:k + 2]))
        shape = [len(p) for p in planes] + [len(range(y0, y1, ys)), len(range(x0, x1, xs)), *self.shape[k + 2:]]
        if 0 in shape:
            out = np.zeros(shape, self.dtype)
        elif not k:  # one plane (a slide): the library's fresh array, not copied
            out = self._read((), y0, y1, x0, x1)[::ys, ::xs]
        else:
            out = np.empty(shape, self.dtype)
            for at in np.ndindex(*shape[:k]):
                out[at] = self._read(tuple(p[j] for p, j in zip(planes, at)), y0, y1, x0, x1)[::ys, ::xs]
        # integer indices drop their stack axes; the channel index applies last
        drop = tuple(slice(None) if isinstance(s, slice) else 0 for s in index[:k])
        return out[drop + (slice(None), slice(None)) + index[k + 2:]]
