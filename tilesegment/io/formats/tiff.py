"""The TIFF family through tifffile: SVS, NDPI, OME-TIFF, QPTIFF and plain tiled TIFF, local or remote.

A local file is chosen by its first bytes (``II*\\0``, ``MM\\0*``, BigTIFF
``II+\\0``, ``MM\\0+``) whatever its name; a URL by its suffix, since looking
inside would cost a request. Levels are read through tifffile's zarr store; a
local single-page tiled level also gets `_TileDecoder`, which reads each tile
with ``os.pread`` and decodes it in one call. A URL is read through a
range-reading file object (`tilesegment.io.remote.open_remote_file`), only the
tiles a region needs.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...errors import InputError, TileSegmentError, cause
from ...registry import readers
from ..remote import is_url, open_remote_file, url_name
from ..sources import Backend, ImageSource, Level, check_level, first_bytes, unreadable

__all__ = ["TiffReader"]

#: The first four bytes of a TIFF (little- and big-endian) and of a BigTIFF.
TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
#: Names of TIFF-family files, for URLs (local files are told by their bytes).
_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".qptiff", ".scn", ".btf", ".tf2", ".tf8", ".bif")


class TiffReader:
    """TIFF-family files through tifffile, from a path or a URL."""

    name = "tiff"
    priority = 10
    formats = "TIFF, SVS, OME-TIFF, NDPI, QPTIFF"

    def can_open(self, target: Any) -> bool:
        """Whether `target` is a TIFF file (by its first bytes) or a URL with a TIFF suffix."""
        if is_url(target):
            return url_name(target).lower().endswith(_SUFFIXES)
        return first_bytes(target, 4) in TIFF_MAGIC

    def open(self, target: Any, *, axes: Optional[str], level: int, series: int,
             storage_options: Optional[dict], ndim: int) -> ImageSource:
        """Open series `series`, level `level` of the TIFF at `target` (a path or URL)."""
        if not is_url(target):
            return _open_tiff(Path(target), axes, level, series)
        handle = open_remote_file(target, storage_options)
        try:
            source = _open_tiff(handle, axes, level, series, name=url_name(target))
        except BaseException:
            handle.close()
            raise
        # tifffile leaves file objects it was given open: close it with the source.
        backend = source.backend
        return replace(source, backend=replace(backend, resources=(*backend.resources, handle)))


readers.register(TiffReader.name, TiffReader())


def _tiff_format(tif) -> str:
    for flag, name in (("is_svs", "svs"), ("is_ndpi", "ndpi"), ("is_qpi", "qptiff"), ("is_ome", "ome-tiff")):
        if getattr(tif, flag, False):
            return name
    return "tiff"


def _open_tiff(path: Any, axes: Optional[str], level: int, series: int,
               name: Optional[str] = None) -> ImageSource:
    """A TIFF-family file from a path or a seekable binary file object (named `name`)."""
    import tifffile
    import zarr

    name = name or Path(path).name
    try:
        tif = tifffile.TiffFile(path, name=name) if not isinstance(path, (str, os.PathLike)) \
            else tifffile.TiffFile(path)
        all_series = tif.series
    except Exception as exc:
        raise unreadable(name, cause(exc)) from None
    resources: tuple = (tif,)  # closed again if anything below fails
    try:
        if not all_series:
            raise InputError(f"{name} holds no image that tifffile can read (no series); the file is "
                             "damaged or truncated")
        if not 0 <= series < len(all_series):
            raise InputError(
                f"series {series} is out of range for {name}: it has {len(all_series)} "
                f"series, 0..{len(all_series) - 1}"
            )
        chosen = all_series[series]
        check_level(level, len(chosen.levels), name)
        _check_tiles(chosen.levels[level], name)
        native = chosen.levels[0].axes

        def open_level(index: int):
            return zarr.open_array(chosen.aszarr(level=index), mode="r")

        try:
            array = open_level(level)
        except Exception as exc:
            raise InputError(f"cannot read {name} (level {level}): {cause(exc)}") from None
        named = (axes or chosen.levels[level].axes).upper()  # an override names every level's axes
        plan = ImageSource(array, named, name=name).plan_axes
        base, z = _tiff_pixel_size(tif), _tiff_z_spacing(tif)
        levels = []
        for lv in chosen.levels:  # TIFF pyramids shrink y and x only
            scale = chosen.levels[0].shape[named.index("X")] / lv.shape[named.index("X")]
            # An unknown z spacing is taken as the x pixel size: isotropic, the neutral guess.
            size = None if base is None else {"Y": base[0] * scale, "X": base[1] * scale, "Z": z or base[1]}
            levels.append(Level(tuple(int(lv.shape[named.index(a)]) for a in plan),
                                None if size is None else tuple(size.get(a, 1.0) for a in plan)))
        # Remote files (file objects) are read through tifffile's own range requests.
        local = isinstance(path, (str, os.PathLike))
        decoder = _TileDecoder.of(path, chosen.levels[level]) if local and not axes else None
        if decoder is not None:
            resources = (tif, decoder)
        backend = Backend(open_level=open_level, decode_chunk=decoder,
                          thumbnails=_tiff_thumbnails(all_series, chosen, native), resources=resources)
        return ImageSource(array, axes or chosen.levels[level].axes, levels[level].pixel_size, name=name,
                           format=_tiff_format(tif), levels=tuple(levels), backend=backend)
    except Exception as exc:
        for resource in resources:
            resource.close()
        if isinstance(exc, TileSegmentError):
            raise
        # tifffile reads tags lazily: a damaged IFD entry (a count, a type, a value that is no
        # member of its enum) fails here, as any exception type, not when the file was opened.
        raise InputError(f"cannot read {name}: its TIFF structure is damaged ({cause(exc)}); "
                         "check the file, or convert it again") from None


def _check_tiles(series, name: str) -> None:
    """Refuse a tiled level that lists fewer tiles than its size needs: a damaged width or
    height (one bit in ImageWidth makes a slide 30 times wider) would otherwise be read as an
    image of mostly missing tiles, slowly, and segmented as background."""
    page = next(iter(getattr(series, "pages", ())), None)
    if page is None or not getattr(page, "is_tiled", False):
        return
    needed, listed = int(np.prod(page.chunked)), len(page.dataoffsets)
    if listed < needed:
        raise InputError(f"{name} is damaged: its size ({' x '.join(map(str, page.shape))}) needs {needed} "
                         f"tiles of {page.tilelength} x {page.tilewidth}, but it lists {listed}")


def _tiff_thumbnails(all_series, chosen, axes: str) -> tuple:
    """Other series that picture the whole of `chosen`, smaller (an SVS "Thumbnail"): same
    axes and channels, same aspect ratio within 2 %. Labels and macro photos differ in aspect."""
    import zarr

    y, x = axes.index("Y"), axes.index("X")
    full = chosen.levels[0].shape
    found = []
    for other in all_series:
        shape = other.shape
        if other is chosen or other.axes != axes or len(other.levels) != 1 or shape[y] >= full[y]:
            continue
        if [n for i, n in enumerate(shape) if i not in (y, x)] != [n for i, n in enumerate(full) if i not in (y, x)]:
            continue
        if abs(shape[y] / shape[x] - full[y] / full[x]) <= 0.02 * full[y] / full[x]:
            found.append(((int(shape[y]), int(shape[x])), lambda s=other: zarr.open_array(s.aszarr(), mode="r")))
    return tuple(found)


class _TileDecoder:
    """Decode one tile of a tiled TIFF page straight from the file.

    tifffile's zarr store costs about 0.5 ms per tile on top of the 1.3 ms a
    256-px JPEG tile takes to decode; reading the tile's bytes with `os.pread`
    (thread-safe, no shared file position) and calling the page's own decoder
    (which releases the GIL in imagecodecs) leaves only the decoding.
    """

    def __init__(self, path: Path, page, shape: tuple[int, int]) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._page = page
        self._shape = shape
        self._tile = (int(page.tilelength), int(page.tilewidth))
        self._across = -(-shape[1] // self._tile[1])

    @classmethod
    def of(cls, path: Path, series) -> Optional["_TileDecoder"]:
        """A decoder for the single, tiled, 2-D (samples interleaved) page of `series`, else None."""
        pages = getattr(series, "pages", ())
        if len(pages) != 1:
            return None
        page = pages[0]
        plain = getattr(page, "is_tiled", False) and getattr(page, "tiledepth", 1) == 1
        interleaved = page.samplesperpixel == 1 or int(page.planarconfig) == 1
        if not (plain and interleaved and series.axes in ("YX", "YXS")):
            return None
        shape = (int(page.imagelength), int(page.imagewidth))
        return cls(path, page, shape)

    def __call__(self, cy: int, cx: int) -> np.ndarray:
        page, index = self._page, cy * self._across + cx
        count, offset = int(page.databytecounts[index]), int(page.dataoffsets[index])
        (hy, hx), (ny, nx) = self._tile, self._shape
        shape = (min(hy, ny - cy * hy), min(hx, nx - cx * hx), int(page.samplesperpixel))
        if not count:  # a tile the file leaves out (Philips slides: background): nodata, as tifffile
            return np.full(shape, page.nodata or 0, page.dtype)
        data = os.pread(self._fd, count, offset)
        tile, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        return tile.reshape(*self._tile, -1)[: shape[0], : shape[1]]

    def close(self) -> None:
        os.close(self._fd)


def _positive(value: Any) -> Optional[float]:
    """`value` as a positive finite float, else None: a damaged or absurd size is an unknown one.

    >>> _positive("0.25"), _positive("0"), _positive("nan"), _positive(b"x")
    (0.25, None, None, None)
    """
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _tiff_z_spacing(tif) -> Optional[float]:
    """Micrometres between Z planes from OME (PhysicalSizeZ) or ImageJ (spacing); None if unknown
    (or not a positive number)."""
    if tif.is_ome and tif.ome_metadata:
        z = re.search(r'PhysicalSizeZ="([0-9.eE+-]+)"', tif.ome_metadata)
        if z:
            return _positive(z.group(1))
    spacing = (getattr(tif, "imagej_metadata", None) or {}).get("spacing")
    return _positive(spacing) if spacing else None


def _tiff_pixel_size(tif) -> Optional[tuple[float, float]]:
    """Micrometres per pixel from OME, Aperio or resolution tags; None if unknown.

    Metadata that does not give a positive finite size (a damaged tag, ``MPP = 0``) counts
    as unknown: the pixels are still readable, and ``mpp=`` then says the size is unknown.
    """
    try:
        size = _tiff_pixel_size_as_stored(tif)
    except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError, OverflowError):
        return None  # a resolution tag of the wrong type or count
    if size is None or any(_positive(v) is None for v in size):
        return None
    return (float(size[0]), float(size[1]))


def _tiff_pixel_size_as_stored(tif) -> Optional[tuple[float, float]]:
    if tif.is_ome and tif.ome_metadata:
        y = re.search(r'PhysicalSizeY="([0-9.eE+-]+)"', tif.ome_metadata)
        x = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        if x and y:
            return (float(y.group(1)), float(x.group(1)))
    page = tif.pages[0]
    if tif.is_svs:
        mpp = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "")
        if mpp:
            return (float(mpp.group(1)),) * 2  # type: ignore[return-value]
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    # ImageJ says its unit in the description (unit=micron) and leaves the tag at NONE.
    imagej_unit = (getattr(tif, "imagej_metadata", None) or {}).get("unit")
    if "XResolution" in tags and "YResolution" in tags and (unit is not None or imagej_unit):
        per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value)) if unit is not None else None
        if imagej_unit in ("micron", "um", "µm", "\\u00B5m"):
            per_unit = 1.0
        xres, yres = tags["XResolution"].value, tags["YResolution"].value
        if per_unit and xres[0] and yres[0] and (xres[0], xres[1]) != (1, 1):
            return (per_unit * yres[1] / yres[0], per_unit * xres[1] / xres[0])
    return None
