"""Plain images (PNG, JPEG, BMP, WebP, GIF) through Pillow, read whole.

Users try a crop before a slide. These formats have no tiles to read one at
a time, so the image is decoded once, into memory, when it is opened; that
is fine at their usual size, and one whose decoded pixels would exceed
`MAX_DECODED_BYTES` is refused before decoding, with the conversion to a
tiled TIFF that reads it out of core. The file is recognised by its
signature (the first bytes), not its name, so a ``.tif`` that is really a
PNG opens, and a ``.png`` that is not an image is named as such.

The image is what a viewer shows: EXIF orientation applied, palette images
expanded to RGB(A), grey with alpha read as grey. The first frame of an
animated GIF or WebP is read unless ``series`` picks another. Plain images
carry no reliable pixel size (a "72 dpi" is a screen convention, not a
measurement), so none is set: pass ``mpp`` only to files that have one.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...errors import InputError, cause
from ...registry import readers
from ..sources import ImageSource, check_level, first_bytes

__all__ = ["PlainImageReader", "MAX_DECODED_BYTES", "signature"]

#: The largest plain image decoded into memory (2 GiB of pixels); a larger one is refused
#: with the command that converts it to a tiled TIFF, which is read tile by tile.
MAX_DECODED_BYTES = 2 * 1024**3

_BOMB_GUARD = threading.Lock()  # Pillow's limit is a module global

#: File signatures: (offset, bytes) -> format name.
_SIGNATURES = (
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"BM", "BMP"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (8, b"WEBP", "WebP"),
)

#: Pillow modes -> the mode the pixels are read in (others are converted to RGB).
_KEEP = {"L": "L", "RGB": "RGB", "RGBA": "RGBA", "I;16": "I;16", "I": "I", "F": "F",
         "1": "L", "LA": "L", "P": "RGB", "PA": "RGBA", "I;16B": "I;16", "I;16L": "I;16"}


def signature(path: Any) -> Optional[str]:
    """The plain-image format `path` starts with (``"PNG"``, ``"JPEG"``...), or None.

    Never raises: a missing or unreadable file, or a URL, is None.

    >>> signature("missing.png") is None
    True
    """
    head = first_bytes(path, 16)
    for offset, magic, name in _SIGNATURES:
        if head[offset:offset + len(magic)] == magic and (name != "WebP" or head[:4] == b"RIFF"):
            return name
    return None


class PlainImageReader:
    """PNG, JPEG, BMP, WebP and GIF files, decoded whole by Pillow."""

    name = "plain"
    priority = 30
    formats = "PNG, JPEG, BMP, WebP, GIF (read whole)"

    def can_open(self, target: Any) -> bool:
        """Whether `target` is a local file with a plain-image signature."""
        return signature(target) is not None

    def open(self, target: Any, *, axes: Optional[str], level: int, series: int,
             storage_options: Optional[dict], ndim: int) -> ImageSource:
        """Decode frame `series` of the image at `target` (level 0 only)."""
        from PIL import Image

        path = Path(target)
        kind = signature(path)
        check_level(level, 1, path.name)
        with _BOMB_GUARD:
            # Our own limit replaces Pillow's decompression-bomb guard (an error from 179 Mpx),
            # which would refuse real microscopy crops that fit in memory.
            before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                pixels = _decode(path, kind, series)
            finally:
                Image.MAX_IMAGE_PIXELS = before
        default = "YXS" if pixels.ndim == 3 else "YX"
        return ImageSource(pixels, axes or default, name=path.name, format=kind.lower())


def _decode(path: Path, kind: str, series: int) -> np.ndarray:
    """Frame `series` of a plain image, as shown (EXIF orientation), in native byte order."""
    from PIL import Image, ImageOps

    try:
        image = Image.open(path)
    except Exception as exc:  # Pillow raises its own types for damaged headers
        raise InputError(f"input {path.name!r} starts like a {kind} file but Pillow cannot read it "
                         f"({cause(exc)}); the file is damaged or not really {kind}") from None
    with image:
        frames = getattr(image, "n_frames", 1)
        if not 0 <= series < frames:
            raise InputError(f"series {series} is out of range for {path.name}: it has {frames} "
                             f"frame(s), 0..{frames - 1}")
        mode = _KEEP.get(image.mode, "RGB")
        channels = len(mode) if mode in ("RGB", "RGBA") else 1
        itemsize = {"I;16": 2, "I": 4, "F": 4}.get(mode, 1)
        decoded = image.width * image.height * channels * itemsize
        if decoded > MAX_DECODED_BYTES:
            raise InputError(
                f"input {path.name!r} is a {image.width} x {image.height} {kind} of {decoded / 1e9:.1f} GB "
                f"decoded, over the {MAX_DECODED_BYTES / 1e9:.1f} GB that plain images may take in memory "
                "(they have no tiles to read one at a time); convert it to a tiled TIFF first, e.g. "
                f"vips tiffsave {path.name} {path.stem}.tif --tile --pyramid --compression jpeg")
        try:
            image.seek(series)
            shown = ImageOps.exif_transpose(image) if series == 0 else image
            pixels = np.asarray(shown.convert(mode) if shown.mode != mode else shown)
        except Exception as exc:
            raise InputError(f"cannot decode {path.name!r} ({cause(exc)}); the {kind} file is truncated "
                             "or damaged") from None
    if pixels.dtype.byteorder == ">":
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    return np.ascontiguousarray(pixels)


readers.register(PlainImageReader.name, PlainImageReader())
