"""DICOM whole-slide images (VL Whole Slide Microscopy Image) through wsidicom.

Through ``wsidicom`` (the extra ``tilesegment[dicom]``), which hospital
archives and the IHE/DICOM WG-26 tools use. A slide is a folder of instances
(one per pyramid level, optical path and label/overview), or one instance
file. Each level is read frame by frame: a frame is a stored tile, decoded
once by `decode_chunk` through wsidicom's ``read_tile``; a region is read
through ``read_region``. Frames a sparse (``TILED_SPARSE``) instance leaves
out come back as wsidicom's blank tile, which is what the standard implies:
white for colour images, black for ``MONOCHROME2`` (fluorescence).

Frames of the commonest kind, 8-bit baseline JPEG in a ``TILED_FULL``
instance (what scanners and wsidicomizer write, an SVS's tiles copied
unchanged), are read encoded and decoded by imagecodecs straight into numpy,
as tifffile decodes an SVS tile: wsidicom's own path goes through Pillow
images and costs two more copies per tile.

``series=`` picks the optical path (0 is the first), for slides scanned with
several illuminations or fluorescence filters. The default focal plane is
read; Z stacks of focal planes are not exposed as a volume.
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

__all__ = ["DicomReader", "open_dicom"]

_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
#: libjpeg colour space of a baseline JPEG frame by photometric interpretation, in imagecodecs'
#: (TIFF photometric) numbering: RGB frames carry no colour transform (DICOM PS3.5 8.2.1)
_JPEG_COLORSPACE = {"RGB": 2, "YBR_FULL_422": None, "YBR_FULL": None, "MONOCHROME2": None}

#: How many files of a folder `DicomReader.can_open` looks at before giving up.
_FILES_LOOKED_AT = 16


def _is_dicom_file(path: Any) -> bool:
    """Whether `path` is a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    return first_bytes(path, 132)[128:] == b"DICM"


class DicomReader:
    """DICOM WSI: a folder of instances, or one instance file."""

    name = "dicom"
    priority = 15
    formats = "DICOM WSI (tilesegment[dicom])"

    def can_open(self, target: Any) -> bool:
        """Whether `target` is a local DICOM file, or a folder whose files include one."""
        if is_url(target) or not isinstance(target, (str, os.PathLike)):
            return False
        try:
            path = Path(target)
            if path.is_file():
                return _is_dicom_file(path)
            if not path.is_dir():
                return False
            files = (p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith("."))
            return any(_is_dicom_file(p) for _, p in zip(range(_FILES_LOOKED_AT), files))
        except (OSError, ValueError):
            return False

    def open(self, target: Any, *, axes: Optional[str], level: int, series: int,
             storage_options: Optional[dict], ndim: int) -> ImageSource:
        """Open level `level`, optical path `series`, of the DICOM slide at `target`."""
        return open_dicom(target, level, series)


def open_dicom(target: Any, level: int = 0, path_index: int = 0) -> ImageSource:
    """The DICOM WSI at `target` (a folder of instances, or one file) as an `ImageSource`.

    Parameters
    ----------
    target : str or PathLike
        The folder of one slide's instances, or one instance file.
    level : int
        Pyramid level, 0 the finest.
    path_index : int
        Optical path, in the order the slide lists them.

    Raises
    ------
    InputError
        When wsidicom is not installed (naming the extra), or cannot read the slide.
    """
    name = Path(target).name
    wsidicom = reader_library("wsidicom", name, "is a DICOM slide", "dicom", "wsidicom")
    try:
        slide = wsidicom.WsiDicom.open(Path(target))
    except Exception as exc:  # WsiDicomNotFoundError, pydicom errors, missing instances
        raise InputError(f"wsidicom cannot read the DICOM slide {name!r} ({cause(exc)}); a slide is "
                         "the folder of its instances, or one instance file") from None
    try:
        pyramid = slide.levels
        check_level(level, len(pyramid), name)
        paths = list(pyramid[0].optical_paths)
        if not 0 <= path_index < len(paths):
            raise InputError(f"series {path_index} is out of range for {name}: it has {len(paths)} optical "
                             f"path(s) ({', '.join(paths)}); pass series= (CLI: --series) from 0 to "
                             f"{len(paths) - 1}")
        dataset = pyramid[0].datasets[0]
        samples, bits = int(dataset.SamplesPerPixel), int(dataset.BitsAllocated)
        if bits not in (8, 16):
            raise InputError(f"{name!r} stores {bits}-bit samples; only 8- and 16-bit DICOM slides are read")
    except Exception:
        slide.close()
        raise

    levels = tuple(Level(shape=(lv.size.height, lv.size.width),
                         # wsidicom's mpp is in micrometres (SizeMm is only its type)
                         pixel_size=None if lv.mpp is None else (float(lv.mpp.height), float(lv.mpp.width)))
                   for lv in pyramid)

    def open_level(i: int) -> "FrameArray":
        return FrameArray(slide, pyramid[i], paths[path_index], samples, np.dtype(f"uint{bits}"))

    array = open_level(level)
    return ImageSource(array, "YXS" if samples > 1 else "YX", pixel_size=levels[level].pixel_size, name=name,
                       format="dicom", levels=levels,
                       backend=Backend(open_level=open_level, decode_chunk=array.read_frame, resources=(slide,)))


class FrameArray(RegionReads):
    """One level and optical path of a DICOM slide as a read-only array-like, ``(Y, X, S)``
    for colour and ``(Y, X)`` for grey: slicing reads the region through wsidicom."""

    def __init__(self, slide: Any, level: Any, path: str, samples: int, dtype: np.dtype) -> None:
        self._slide, self._level, self._path = slide, level.level, path
        self.dtype = dtype
        self._samples = samples
        self.shape = (level.size.height, level.size.width) + ((samples,) if samples > 1 else ())
        self.chunks = (level.tile_size.height, level.tile_size.width) + self.shape[2:]
        data = level.default_instance.image_data
        dataset = level.datasets[0]
        self._jpeg = (str(data.transfer_syntax) == _JPEG_BASELINE and dtype == np.uint8
                      and data.photometric_interpretation in _JPEG_COLORSPACE
                      and getattr(dataset, "DimensionOrganizationType", "") == "TILED_FULL")
        self._colorspace = _JPEG_COLORSPACE.get(data.photometric_interpretation)

    def _pixels(self, image: Any) -> np.ndarray:
        pixels = np.asarray(image)
        if self._samples > 1 and pixels.shape[-1] != self._samples:  # a grey blank tile in a colour slide
            pixels = np.broadcast_to(pixels[..., None], (*pixels.shape[:2], self._samples))
        return pixels.astype(self.dtype, copy=False)

    def read_frame(self, iy: int, ix: int) -> np.ndarray:
        """The stored tile (frame) at row `iy`, column `ix`, decoded once, clipped to the image,
        as ``(Y, X, C)``."""
        if self._jpeg:
            import imagecodecs

            # uncropped: wsidicom crops an edge frame by decoding and encoding it again
            frame = self._slide.read_encoded_tile(self._level, (ix, iy), path=self._path,
                                                  crop_to_image_boundary=False)
            jfif = frame[6:10] == b"JFIF"
            tile = imagecodecs.jpeg8_decode(frame, colorspace=None if jfif else self._colorspace,
                                            outcolorspace=2 if self._samples == 3 else None)
            y0, x0 = iy * self.chunks[0], ix * self.chunks[1]
            tile = tile[:self.shape[0] - y0, :self.shape[1] - x0]
        else:
            tile = self._pixels(self._slide.read_tile(self._level, (ix, iy), path=self._path))
        return tile if tile.ndim == 3 else tile[..., None]

    def _read(self, plane: tuple[int, ...], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self._pixels(self._slide.read_region((x0, y0), self._level, (x1 - x0, y1 - y0), path=self._path))


readers.register(DicomReader.name, DicomReader())
