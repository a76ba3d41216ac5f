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
- Only the full-resolution level is exposed: coarser levels (``--mpp``,
  overviews) are made from it by tilesegment's resampling, not read from
  the file's pyramid subblocks, which pylibCZIrw cannot write for testing.
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
        """Open scene `series` of the CZI at `target` (only level 0 exists)."""
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
    check_level(level, 1, name)
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
    array = SubblockArray(reader, pyczi, box, scene_id, stack, {a: bounds[a][0] for a in "TZC" if a in bounds},
                          tuple(sizes[a] for a in stack), np.dtype(dtype), samples, _subblock_edge(reader))
    pixel_size = _pixel_size(reader.metadata, "ZYX" if "Z" in stack else "YX")
    return ImageSource(array, stack + "YX" + ("S" if samples > 1 else ""), pixel_size=pixel_size, name=name,
                       format="czi", levels=(Level(shape=array.shape[len(stack):len(stack) + 2],
                                                   pixel_size=pixel_size and pixel_size[-2:]),),
                       backend=Backend(resources=(reader,)))


def _subblock_edge(reader: Any) -> tuple[int, int]:
    """The commonest (height, width) of the full-resolution subblocks: the file's tile grid."""
    sizes: Counter = Counter()

    def count(_: int, info: Any) -> bool:
        if info.get_zoom() == 1.0:
            sizes[(info.logicalRect.h, info.logicalRect.w)] += 1
        return sizes.total() < 4096  # enough to know the grid; False stops the enumeration

    reader.enumerate_subblocks(count)
    return sizes.most_common(1)[0][0] if sizes else (1024, 1024)


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


class SubblockArray:
    """One scene of a CZI as a read-only array-like over ``(*stack, Y, X[, S])``: slicing
    reads each plane's region through libCZI, which composes it from the subblocks."""

    def __init__(self, reader: Any, pyczi: Any, box: Any, scene: Optional[int], stack: str,
                 start: dict, stack_shape: tuple[int, ...], dtype: np.dtype, samples: int,
                 edge: tuple[int, int]) -> None:
        self._reader, self._box, self._scene, self._stack, self._start = reader, box, scene, stack, start
        self._samples = samples
        # libCZI takes the fill as a colour in [0, 1]; brightfield gaps are white, fluorescence 0
        self._fill = pyczi.Color(1.0, 1.0, 1.0) if samples > 1 else pyczi.Color(0.0, 0.0, 0.0)
        self._lock = threading.Lock()  # one libCZI reader, not documented as thread-safe
        self.dtype = dtype
        tail = (samples,) if samples > 1 else ()
        self.shape = stack_shape + (box.h, box.w) + tail
        self.ndim = len(self.shape)
        self.chunks = (1,) * len(stack) + edge + tail

    def _read_plane(self, roi: tuple[int, int, int, int], plane: dict) -> np.ndarray:
        """The region `roi` (x, y, w, h, in the file's coordinates) of one plane, ``(h, w, S)``."""
        with self._lock:
            pixels = self._reader.read(roi=roi, plane=plane, scene=self._scene, background_pixel=self._fill)
        if self._samples > 1:  # BGR -> RGB in place: three times faster than a reversed copy
            blue = pixels[..., 0].copy()
            pixels[..., 0] = pixels[..., 2]
            pixels[..., 2] = blue
        return pixels

    def __getitem__(self, index: Any) -> np.ndarray:
        if not isinstance(index, tuple):
            index = (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        k = len(self._stack)
        planes = [range(self.shape[i])[s] if isinstance(s, slice) else [range(self.shape[i])[s]]
                  for i, s in enumerate(index[:k])]
        (y0, y1, ys), (x0, x1, xs) = (s.indices(n) for s, n in zip(index[k:k + 2], self.shape[k:k + 2]))
        roi = (self._box.x + x0, self._box.y + y0, max(x1 - x0, 0), max(y1 - y0, 0))
        if not k and roi[2] and roi[3]:  # one plane (a slide): libCZI's fresh array, no copy
            out = self._read_plane(roi, dict(self._start))[::ys, ::xs]
        else:
            out = np.empty([len(p) for p in planes] + [len(range(y0, y1, ys)), len(range(x0, x1, xs)),
                                                        self._samples], self.dtype)
            if out.size:
                for at in np.ndindex(*out.shape[:k]):
                    plane = {**self._start, **{a: self._start[a] + planes[i][j]
                                                 for i, (a, j) in enumerate(zip(self._stack, at))}}
                    out[at] = self._read_plane(roi, plane)[::ys, ::xs]
        # integer indices drop their axes; the sample axis is kept only for colour
        drop = tuple(0 if not isinstance(s, slice) else slice(None) for s in index[:k])
        out = out[drop + (Ellipsis,)]
        if self._samples == 1:
            return out[..., 0]
        return out[..., index[-1]]


readers.register(CziReader.name, CziReader())
