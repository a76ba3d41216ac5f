"""Zeiss CZI through pylibCZIrw (Zeiss's own libCZI): brightfield slides and fluorescence stacks.

Through ``pylibCZIrw`` (the extra ``tilesegment[czi]``), chosen over
czifile because it is Zeiss's maintained library: it decodes JPG-XR and
zstd subblocks, composes a region from overlapping subblocks as ZEN does,
and reads scenes. A file is recognised by its first bytes (``ZISRAWFILE``).

- ``series=`` picks the scene (0 is the first); a file without scenes is one.
- Brightfield (``Bgr24``/``Bgr48``) reads as RGB (``YXS``); fluorescence
  (``Gray8``/``Gray16``/``Gray32Float``) as channels (``CYX``), with a ``Z``
  axis for Z stacks and ``T`` for time series.
- The chunk grid is the subblocks' size, so the tiler asks for whole,
  aligned subblocks and libCZI decodes each once.
- Areas no subblock covers come back as the fill value: white for
  brightfield, 0 for fluorescence.
- Pixel size comes from the ``Scaling`` metadata.
- The pyramid is the file's pyramid subblocks (those stored at 1/2, 1/3...
  of their size), one level per factor, read by libCZI at that zoom, so
  ``--level``, ``--mpp`` and overviews read them rather than full
  resolution; level k is ``floor(size / factor)`` pixels, pixel ``i`` of it
  at full-resolution ``i * factor``. Pyramids are read for 2-D images; a Z
  stack or time series is read at full resolution.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...errors import InputError, cause
from ...registry import readers
from ..sources import Backend, ImageSource, Level, check_level, first_bytes, reader_library
from ._regions import RegionReads

__all__ = ["CziReader", "open_czi"]

_MAGIC = b"ZISRAWFILE"
#: libCZI pixel type -> (numpy dtype, samples per pixel)
_PIXEL_TYPES = {"Gray8": ("uint8", 1), "Gray16": ("uint16", 1), "Gray32Float": ("float32", 1),
                "Bgr24": ("uint8", 3), "Bgr48": ("uint16", 3)}


class CziReader:
    """Zeiss CZI files, by their first bytes."""

    name = "czi"
    priority = 25
    formats = "CZI (tilesegment[czi])"

    def can_open(self, target: Any) -> bool:
        """Whether `target` is a local file that starts like a CZI."""
        return first_bytes(target, len(_MAGIC)) == _MAGIC

    def open(self, target: Any, *, axes: Optional[str], level: int, series: int,
             storage_options: Optional[dict], ndim: int) -> ImageSource:
        """Open scene `series`, pyramid level `level`, of the CZI at `target`."""
        return open_czi(target, level, series)


def open_czi(target: Any, level: int = 0, scene: int = 0) -> ImageSource:
    """Scene `scene` of the CZI file at `target`, as an `ImageSource`.

    Raises
    ------
    InputError
        When pylibCZIrw is not installed (naming the extra), the file is
        damaged, or the scene, level or pixel type is not there.
    """
    name = Path(target).name
    pyczi = reader_library("pylibCZIrw.czi", name, "is a Zeiss CZI", "czi", "pylibCZIrw")
    try:
        reader = pyczi.CziReader(str(target))
    except Exception as exc:
        raise InputError(f"pylibCZIrw cannot read {name!r} ({cause(exc)}); the file may be damaged or "
                         "not a CZI") from None
    try:
        return _source(reader, pyczi, name, level, scene)
    except Exception:
        reader.close()
        raise


def _source(reader: Any, pyczi: Any, name: str, level: int, scene: int) -> ImageSource:
    scenes = reader.scenes_bounding_rectangle
    if scenes:
        keys = sorted(scenes)
        if not 0 <= scene < len(keys):
            raise InputError(f"series {scene} is out of range for {name}: it has {len(keys)} scene(s); "
                             f"pass series= (CLI: --series) from 0 to {len(keys) - 1}")
        box, scene_id = scenes[keys[scene]], keys[scene]
    elif scene != 0:
        raise InputError(f"series {scene} is out of range for {name}: it has one scene; pass series=0")
    else:
        box, scene_id = reader.total_bounding_rectangle, None
    types = set(reader.pixel_types.values())
    if len(types) != 1 or next(iter(types)) not in _PIXEL_TYPES:
        raise InputError(f"{name!r} has pixel types {sorted(types)}; tilesegment reads CZIs whose channels "
                         f"share one of {', '.join(_PIXEL_TYPES)}")
    dtype, samples = _PIXEL_TYPES[next(iter(types))]
    bounds = reader.total_bounding_box
    sizes = {a: bounds[a][1] - bounds[a][0] for a in "TZC" if a in bounds}
    if samples > 1 and sizes.get("C", 1) > 1:
        raise InputError(f"{name!r} has {sizes['C']} colour (Bgr) channels; tilesegment reads one")
    stack = "".join(a for a in "TZC" if sizes.get(a, 1) > 1)
    grids = _grids(reader)
    planar = not any(a in stack for a in "TZ")
    factors = [f for f in grids if f == 1 or (planar and box.h // f and box.w // f)]
    check_level(level, len(factors), name)
    base = _pixel_size(reader.metadata, "ZYX" if "Z" in stack else "YX")
    planes = tuple(sizes[a] for a in stack if a in "TZ")
    levels = tuple(Level(shape=planes + (box.h // f, box.w // f),
                         pixel_size=None if base is None else base[:-2] + (base[-2] * f, base[-1] * f))
                   for f in factors)
    start = {a: bounds[a][0] for a in "TZC" if a in bounds}

    def open_level(i: int) -> "SubblockArray":
        return SubblockArray(reader, pyczi, box, scene_id, stack, start, tuple(sizes[a] for a in stack),
                             np.dtype(dtype), samples, factors[i], grids[factors[i]])

    return ImageSource(open_level(level), stack + "YX" + ("S" if samples > 1 else ""),
                       pixel_size=levels[level].pixel_size, name=name, format="czi", levels=levels,
                       backend=Backend(open_level=open_level, resources=(reader,)))


def _grids(reader: Any) -> dict[int, tuple[int, int]]:
    """The file's tile grids: for each factor its subblocks are stored at (1 for full resolution,
    2, 3... for pyramid subblocks), the commonest stored (height, width), factors ascending."""
    sizes: dict[int, Counter] = {}

    def count(_: int, info: Any) -> bool:
        zoom = info.get_zoom()
        factor = 1 if zoom >= 1 or zoom <= 0 else round(1 / zoom)
        sizes.setdefault(factor, Counter())[(info.physicalSize.h, info.physicalSize.w)] += 1
        return True  # go on: pyramid subblocks may come last

    reader.enumerate_subblocks(count)
    grids = {f: counts.most_common(1)[0][0] for f, counts in sorted(sizes.items())}
    return grids if 1 in grids else {1: (1024, 1024), **grids}


def _pixel_size(metadata: dict, axes: str) -> Optional[tuple[float, ...]]:
    """Pixel size in micrometres along `axes` from the CZI ``Scaling`` (metres), if all are given."""
    try:
        items = metadata["ImageDocument"]["Metadata"]["Scaling"]["Items"]["Distance"]
        items = items if isinstance(items, list) else [items]
        metres = {d["@Id"]: float(d["Value"]) for d in items}
        size = tuple(metres[a] * 1e6 for a in axes)
    except (KeyError, TypeError, ValueError):
        return None
    return size if all(v > 0 for v in size) else None


class SubblockArray(RegionReads):
    """One scene of a CZI as a read-only array-like over ``(*stack, Y, X[, S])``: slicing
    reads each plane's region through libCZI, which composes it from the subblocks."""

    def __init__(self, reader: Any, pyczi: Any, box: Any, scene: Optional[int], stack: str,
                 start: dict, stack_shape: tuple[int, ...], dtype: np.dtype, samples: int,
                 factor: int, edge: tuple[int, int]) -> None:
        self._reader, self._box, self._scene, self._axes, self._start = reader, box, scene, stack, start
        self._samples, self._factor = samples, factor
        self.stack = len(stack)
        # libCZI takes the fill as a colour in [0, 1]; brightfield gaps are white, fluorescence 0
        self._fill = pyczi.Color(1.0, 1.0, 1.0) if samples > 1 else pyczi.Color(0.0, 0.0, 0.0)
        self._lock = threading.Lock()  # one libCZI reader, not documented as thread-safe
        self.dtype = dtype
        tail = (samples,) if samples > 1 else ()
        self.shape = stack_shape + (box.h // factor, box.w // factor) + tail
        self.chunks = (1,) * len(stack) + edge + tail

    def _read(self, plane: tuple[int, ...], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        f = self._factor
        # libCZI's output is floor(roi * zoom) pixels; one more full-resolution pixel makes that
        # exactly the level's pixels (without it, some regions come back shifted by one)
        extra = 1 if f > 1 else 0
        roi = (self._box.x + x0 * f, self._box.y + y0 * f, (x1 - x0) * f + extra, (y1 - y0) * f + extra)
        coordinate = {**self._start, **{a: self._start[a] + i for a, i in zip(self._axes, plane)}}
        with self._lock:
            pixels = self._reader.read(roi=roi, plane=coordinate, scene=self._scene,
                                       zoom=1 / f if f > 1 else None, background_pixel=self._fill)
        pixels = pixels[:y1 - y0, :x1 - x0]
        if self._samples == 1:
            return pixels[..., 0]
        blue = pixels[..., 0].copy()  # BGR -> RGB in place: three times faster than a reversed copy
        pixels[..., 0] = pixels[..., 2]
        pixels[..., 2] = blue
        return pixels


readers.register(CziReader.name, CziReader())
