"""Slides that only OpenSlide reads well: 3DHistech MRXS, Hamamatsu VMS/VMU, Ventana BIF, Sakura SVSLIDE.

Through ``openslide-python`` and the self-contained ``openslide-bin`` wheel
(the extra ``tilesegment[openslide]``). tifffile stays first for the TIFFs it
reads well (SVS, NDPI, generic TIFF); this reader takes the formats it does
not read (MRXS's folder of JPEG tiles, VMS's index) or reads wrong (a BIF's
tiles overlap, which a plain TIFF reader ignores), asked before tifffile so
that a BIF, which starts like any TIFF, comes here, by its name or, named
``.tif``, by the ``iScan`` element in its XMP (OpenSlide's own test).

OpenSlide's API reads regions (``read_region``), not stored tiles, so a
region costs a call into OpenSlide that may decode tiles shared with its
neighbours again (OpenSlide caches decoded tiles, 32 MB by default). The
reader exposes the level's tile size as its chunk grid, so the tiler asks
for whole, aligned tiles, and each region OpenSlide decodes is one tile
when the grid matches its storage. Regions outside the scanned area (MRXS
and BIF leave them out) come back transparent and are filled with the
slide's background colour (``openslide.background-color``, else white).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...errors import InputError, cause
from ...registry import readers
from ..remote import is_url
from ..sources import Backend, ImageSource, Level, check_level, first_bytes, reader_library
from ._regions import RegionReads
from .tiff import TIFF_MAGIC

__all__ = ["OpenSlideReader", "SUFFIXES"]

#: Files this reader takes (by name: MRXS and VMS are an index file beside their data).
SUFFIXES = (".mrxs", ".vms", ".vmu", ".bif", ".svslide")
#: Tile edge used as the chunk grid when OpenSlide does not report one.
_DEFAULT_TILE = 512


class OpenSlideReader:
    """MRXS, VMS/VMU, BIF and SVSLIDE through OpenSlide, region by region."""

    name = "openslide"
    priority = 8  # before tifffile (10): a BIF starts like any TIFF, but its tiles overlap
    formats = "MRXS, VMS/VMU, BIF, SVSLIDE (tilesegment[openslide])"

    def can_open(self, target: Any) -> bool:
        """Whether `target` is a local file with one of `SUFFIXES`, or a Ventana BIF by its content
        (a TIFF whose XMP holds an ``iScan`` element, as OpenSlide detects it), whatever its name:
        scanners also write BIFs as ``.tif``, which tifffile would read without their tile overlaps."""
        if is_url(target) or not isinstance(target, (str, os.PathLike)):
            return False
        try:
            if Path(target).suffix.lower() in SUFFIXES:
                return Path(target).is_file()
        except (OSError, ValueError):
            return False
        return is_ventana(target)

    def open(self, target: Any, *, axes: Optional[str], level: int, series: int,
             storage_options: Optional[dict], ndim: int) -> ImageSource:
        """Open level `level` of the slide at `target` (RGB, ``YXS``)."""
        return open_slide(target, level)


#: Directories whose XMP `is_ventana` looks at (a BIF's is on its first pages).
_PAGES_LOOKED_AT = 4


def is_ventana(path: Any) -> bool:
    """Whether the local file `path` is a Ventana BIF by its content: a TIFF whose XMP tag, on
    one of its first directories, holds an ``iScan`` element. Never raises."""
    if first_bytes(path, 4) not in TIFF_MAGIC:
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages[:_PAGES_LOOKED_AT]:
                xmp = page.tags.get(700)  # XMP
                value = b"" if xmp is None else xmp.value
                if b"<iScan" in (value.encode() if isinstance(value, str) else bytes(value)):
                    return True
    except Exception:  # damaged TIFFs are the tiff reader's to report
        return False
    return False


def open_slide(target: Any, level: int = 0) -> ImageSource:
    """Any slide OpenSlide reads (also a generic TIFF or an SVS), as an `ImageSource`.

    The reader takes only the formats tifffile does not read well; this
    opens any of OpenSlide's, for comparisons and for users who want
    OpenSlide's decoding.

    Raises
    ------
    InputError
        When openslide is not installed (naming the extra) or cannot read the file.
    """
    openslide = reader_library("openslide", Path(target).name, "needs OpenSlide", "openslide",
                               "openslide-python with the openslide-bin library")
    path = Path(target)
    try:
        slide = openslide.OpenSlide(str(path))
    except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError
        raise InputError(f"OpenSlide cannot read {path.name!r} ({cause(exc)}); for MRXS and VMS keep the "
                         "index file beside its data folder, as the scanner wrote them") from None
    check_level(level, slide.level_count, path.name)
    props = slide.properties
    mpp = [props.get(f"openslide.mpp-{a}") for a in "yx"]
    base = tuple(float(v) for v in mpp) if all(mpp) else None
    levels = tuple(Level(shape=(h, w), pixel_size=None if base is None else
                         (base[0] * slide.level_downsamples[i], base[1] * slide.level_downsamples[i]))
                   for i, (w, h) in enumerate(slide.level_dimensions))
    background = props.get("openslide.background-color") or "FFFFFF"
    fill = np.array([int(background[k:k + 2], 16) for k in (0, 2, 4)], np.uint8)

    def open_level(i: int) -> "RegionArray":
        tile = (int(props.get(f"openslide.level[{i}].tile-height", _DEFAULT_TILE)),
                int(props.get(f"openslide.level[{i}].tile-width", _DEFAULT_TILE)))
        return RegionArray(slide, i, tile, fill)

    return ImageSource(open_level(level), "YXS", pixel_size=levels[level].pixel_size, name=path.name,
                       format=f"openslide {slide.detect_format(str(path)) or ''}".strip(), levels=levels,
                       backend=Backend(open_level=open_level, resources=(slide,)))


class RegionArray(RegionReads):
    """One level of an OpenSlide slide as a read-only ``(Y, X, 3)`` uint8 array-like: slicing
    reads that region through ``read_region`` (RGBA, composited over the background)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, slide: Any, level: int, tile: tuple[int, int], fill: np.ndarray) -> None:
        self._slide, self._level, self._fill = slide, level, fill
        w, h = slide.level_dimensions[level]
        self.shape = (h, w, 3)
        self.chunks = (*tile, 3)  # the chunk grid the tiler reads in
        self._scale = slide.level_downsamples[level]

    def _read(self, plane: tuple[int, ...], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        # read_region takes level-0 coordinates for the corner, level coordinates for the size
        corner = (int(round(x0 * self._scale)), int(round(y0 * self._scale)))
        rgba = np.asarray(self._slide.read_region(corner, self._level, (x1 - x0, y1 - y0)))
        if rgba[..., 3].min() == 255:  # scanned everywhere (the usual case): no compositing
            return rgba[..., :3]
        alpha = rgba[..., 3:4].astype(np.uint16)
        return ((rgba[..., :3] * alpha + self._fill * (255 - alpha) + 127) // 255).astype(np.uint8)


readers.register(OpenSlideReader.name, OpenSlideReader())
