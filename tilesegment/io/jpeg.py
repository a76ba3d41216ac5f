"""JPEG tiles of whole-slide TIFFs as self-contained streams any decoder reads alike.

Aperio and other slide writers (libtiff's JPEG codec) store *abbreviated*
streams: each tile holds its frame and scan, and the quantization and Huffman
tables shared by all tiles sit once in the TIFF's ``JPEGTables`` tag. They
also write neither a JFIF nor an Adobe marker, so a decoder that is not told
the TIFF's ``Photometric`` (nvJPEG, torchvision's ``decode_jpeg``) must guess
whether the three components are RGB or YCbCr. `self_contained` splices the
tables in and adds the Adobe marker that says which, so a decoder needs only
the bytes: that is all a GPU decoder swap requires.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

__all__ = ["abbreviate", "segments", "self_contained"]

SOI, EOI = b"\xff\xd8", b"\xff\xd9"
_DQT, _DHT, _SOS, _APP0, _APP14 = 0xDB, 0xC4, 0xDA, 0xE0, 0xEE
#: TIFF Photometric values of 3-sample JPEG tiles, and the Adobe transform flag each means.
_TRANSFORM = {2: 0, 6: 1}  # RGB: components coded as they are; YCbCr: coded as YCbCr


def segments(stream: bytes) -> Iterator[tuple[int, bytes]]:
    """The marker segments of a JPEG stream after SOI, as ``(marker, bytes)``; the last one is
    the scan (SOS to the end of the stream), or EOI in a tables-only stream.

    Examples
    --------
    >>> [hex(m) for m, _ in segments(b"\\xff\\xd8\\xff\\xdb\\x00\\x02\\xff\\xd9")]
    ['0xdb', '0xd9']
    """
    if stream[:2] != SOI:
        raise ValueError(f"not a JPEG stream: starts with {stream[:2]!r}, not SOI {SOI!r}")
    i = 2
    while i < len(stream):
        marker = stream[i + 1]
        if marker in (_SOS, EOI[1]):
            yield marker, stream[i:]
            return
        (length,) = struct.unpack(">H", stream[i + 2:i + 4])
        yield marker, stream[i:i + 2 + length]
        i += 2 + length


def abbreviate(stream: bytes) -> tuple[bytes, bytes]:
    """Split a complete JPEG stream as libtiff writes a slide's tiles: ``(tables, tile)``.

    ``tables`` is SOI + the quantization and Huffman tables + EOI (a
    ``JPEGTables`` tag's value); ``tile`` is the rest without the JFIF and
    Adobe markers, which libtiff does not write.
    """
    tables, rest = [], []
    for marker, segment in segments(stream):
        if marker in (_DQT, _DHT):
            tables.append(segment)
        elif marker not in (_APP0, _APP14):
            rest.append(segment)
    return SOI + b"".join(tables) + EOI, SOI + b"".join(rest)


def self_contained(tile: bytes, tables: bytes | None, photometric: int) -> bytes:
    """A tile's stream that any decoder decodes as the TIFF means it.

    Parameters
    ----------
    tile : bytes
        The tile's bytes as stored (abbreviated or complete).
    tables : bytes or None
        The TIFF's ``JPEGTables`` (SOI, tables, EOI), or None where the tiles
        carry their own.
    photometric : int
        The TIFF's ``Photometric``: 2 (RGB: components coded without a colour
        transform) or 6 (YCbCr). One-component tiles (1, grey) need no marker.

    Returns
    -------
    bytes
        SOI, an Adobe APP14 marker saying the colour transform (unless the
        tile has a JFIF or Adobe marker already, or one component), the
        tables, and the tile's frame and scan.

    Raises
    ------
    ValueError
        If `tile` or `tables` is not a JPEG stream, or `photometric` is
        neither grey, RGB nor YCbCr.
    """
    body = tile[2:] if tile[:2] == SOI else None
    if body is None:
        raise ValueError(f"tile is not a JPEG stream: starts with {tile[:2]!r}, not SOI {SOI!r}")
    if tables is not None:
        if tables[:2] != SOI or tables[-2:] != EOI:
            raise ValueError("JPEGTables must be SOI, tables, EOI")
        body = tables[2:-2] + body
    if photometric in (0, 1):
        return SOI + body
    if photometric not in _TRANSFORM:
        raise ValueError(f"Photometric {photometric} is not RGB (2) or YCbCr (6); cannot mark the colour space")
    if any(marker in (_APP0, _APP14) for marker, _ in segments(tile)):
        return SOI + body  # the writer said which already
    # Adobe APP14: length 14, "Adobe", version 100, flags0, flags1, transform.
    adobe = b"\xff\xee" + struct.pack(">H5sHHHB", 14, b"Adobe", 100, 0, 0, _TRANSFORM[photometric])
    return SOI + adobe + body
