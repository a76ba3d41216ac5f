"""Read an image at a target pixel size: choose a pyramid level, then area-resample."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from ..errors import InputError

__all__ = ["ResampledSource", "at_pixel_size", "area_weights"]


def area_weights(start: int, stop: int, factor: float, first_input: int, n_input: int) -> np.ndarray:
    """Weights ``(stop - start, n_input)`` of the area (box) resampling of one axis.

    Output pixel ``i`` covers input interval ``[i * factor, (i + 1) * factor)``;
    each input pixel ``first_input + j`` contributes its overlap with that
    interval, divided by `factor`. Weights depend only on global coordinates,
    so any region gives the same pixels as the whole image.
    """
    i = np.arange(start, stop, dtype=np.float64)[:, None]
    j = np.arange(first_input, first_input + n_input, dtype=np.float64)[None, :]
    lo, hi = i * factor, (i + 1) * factor
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None)
    return (overlap / factor).astype(np.float32)


@dataclass(frozen=True, eq=False)
class ResampledSource:
    """An image source seen at a coarser pixel size (area averaging, exact per region).

    Reads the needed region of `base` and averages each output pixel over the
    input area it covers (weights from `area_weights`). Integer images are
    rounded back to their dtype so normalization is unchanged.
    """

    base: object
    factor: tuple[float, float]
    pixel_size: Optional[tuple[float, float]]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(max(1, int(math.floor(n / f + 1e-9))) for n, f in zip(self.base.shape, self.factor))  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return self.base.channels

    @property
    def chunk_shape(self) -> None:
        """None: resampled pixels are computed per region, not stored in chunks."""
        return None

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def format(self) -> str:
        return self.base.format

    @property
    def axes(self) -> str:
        return "YXC"

    @property
    def levels(self) -> tuple:
        return ()

    @property
    def plan_axes(self) -> str:
        return "YX"

    @property
    def ndim(self) -> int:
        return 2

    def read_region(self, start, stop, step: int = 1) -> np.ndarray:
        return self.read(start[0], stop[0], start[1], stop[1], step)

    def read(self, y0: int, y1: int, x0: int, x1: int, step: int = 1) -> np.ndarray:
        (fy, fx), (ny, nx) = self.factor, self.base.shape
        iy0, iy1 = int(math.floor(y0 * fy)), min(ny, int(math.ceil(y1 * fy)))
        ix0, ix1 = int(math.floor(x0 * fx)), min(nx, int(math.ceil(x1 * fx)))
        region = self.base.read(iy0, iy1, ix0, ix1).astype(np.float32)
        wy = area_weights(y0, y1, fy, iy0, iy1 - iy0)
        wx = area_weights(x0, x1, fx, ix0, ix1 - ix0)
        out = np.einsum("ij,jkc,lk->ilc", wy, region, wx, optimize=True)
        if self.dtype.kind in "ui":
            info = np.iinfo(self.dtype)
            out = np.clip(np.rint(out), info.min, info.max).astype(self.dtype)
        elif self.dtype.kind == "f":
            out = out.astype(self.dtype)
        return out[::step, ::step]

    def overview(self, max_edge: int = 2048) -> np.ndarray:
        """The base image's overview: it pictures the same area, and costs no resampling."""
        return self.base.overview(max_edge)

    def reopen(self) -> "ResampledSource":
        """The same resampling of the base source opened again (`ImageSource.reopen`)."""
        return replace(self, base=self.base.reopen())

    def close(self) -> None:
        self.base.close()


def at_pixel_size(source, mpp: float):
    """`source` resampled to `mpp` um/px from the best pyramid level.

    The coarsest level whose pixel size is at most `mpp` is read; if it is
    not already `mpp` (within 0.1 %), it is area-resampled. Only downsampling
    is done: a target finer than the file is an error.
    """
    if mpp <= 0:
        raise InputError(f"mpp {mpp} must be positive (micrometres per pixel)")
    if source.ndim != 2:
        raise InputError(f"mpp= resamples 2-d images; {source.name} has axes {source.plan_axes}: "
                         "use level= to pick a pyramid level")
    if source.pixel_size is None:
        raise InputError(
            f"mpp={mpp} needs the pixel size of {source.name}, which does not record one; "
            "use level= instead"
        )
    levels = source.levels or ()
    finest = min(source.pixel_size)
    if mpp < finest * 0.999:
        raise InputError(
            f"mpp {mpp} is finer than {source.name}'s {finest:.4g} um/px; choose mpp >= {finest:.4g}"
        )
    usable = [i for i, lv in enumerate(levels) if lv.pixel_size and max(lv.pixel_size) <= mpp * 1.001]
    if usable and usable[-1] != 0 and source.backend.open_level is not None:
        source = source.at_level(usable[-1])
    factor = tuple(mpp / p for p in source.pixel_size)
    if all(abs(f - 1) < 1e-3 for f in factor):
        return source
    return ResampledSource(source, factor, (mpp, mpp))
