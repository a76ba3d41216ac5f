"""Self-contained JPEG tile streams (tilesegment.io.jpeg): a decoder that sees only the bytes,
as a GPU decoder does, gets exactly what tifffile decodes from the slide."""

import imagecodecs
import numpy as np
import pytest
import tifffile

from tilesegment.io.jpeg import abbreviate, segments, self_contained

TILE = 128


def svs_like(path, image, photometric):
    """A TIFF written as libtiff writes a slide: abbreviated tiles, shared JPEGTables, no
    JFIF/Adobe markers; RGB-coded tiles (Aperio) or YCbCr-coded ones."""
    tables, tiles = None, []
    for y in range(0, image.shape[0], TILE):
        for x in range(0, image.shape[1], TILE):
            pixels = image[y:y + TILE, x:x + TILE]
            if photometric == "rgb":
                stream = imagecodecs.jpeg8_encode(pixels, level=85, colorspace="RGB", outcolorspace="RGB")
            else:
                stream = imagecodecs.jpeg8_encode(pixels, level=85, outcolorspace="YCBCR", subsampling="444")
            tables, tile = abbreviate(stream)  # every tile of one quality has the same tables
            tiles.append(tile)
    # tifffile tags a JPEG RGB image YCbCr unless told the coded colour space is RGB.
    coded = {"subsampling": (1, 1)} if photometric == "ycbcr" else {"compressionargs": {"outcolorspace": "rgb"}}
    tifffile.imwrite(path, iter(tiles), shape=image.shape, dtype=np.uint8, tile=(TILE, TILE),
                     photometric=photometric, compression="jpeg", extratags=[(347, 7, len(tables), tables, True)],
                     **coded)


@pytest.fixture(scope="module")
def image():
    yy, xx = np.mgrid[0:384, 0:256]
    smooth = np.stack([128 + 100 * np.sin(yy / 20), 128 + 100 * np.cos(xx / 15), (yy + xx) % 256], -1)
    noise = np.random.default_rng(0).normal(0, 20, smooth.shape)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("photometric", ["rgb", "ycbcr"])
def test_spliced_tiles_decode_as_tifffile_decodes_the_slide(tmp_path, image, photometric):
    svs_like(tmp_path / "slide.tif", image, photometric)
    with tifffile.TiffFile(tmp_path / "slide.tif") as tif:
        page = tif.pages[0]
        assert page.jpegtables is not None and page.photometric == {"rgb": 2, "ycbcr": 6}[photometric]
        expected = page.asarray()
        tiles = []
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            tif.filehandle.seek(offset)
            tiles.append(self_contained(tif.filehandle.read(count), page.jpegtables, page.photometric))
    decoded = np.stack([imagecodecs.jpeg8_decode(t) for t in tiles])
    across = image.shape[1] // TILE
    assert np.array_equal(decoded, expected.reshape(-1, TILE, across, TILE, 3).swapaxes(1, 2).reshape(decoded.shape))
    # and that is the image, lossy as JPEG is: a colour space mistaken is off by tens on average
    assert np.abs(expected.astype(int) - image).mean() < 12


def test_the_marker_says_the_colour_transform_and_is_not_doubled():
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)
    stream = imagecodecs.jpeg8_encode(pixels, colorspace="RGB", outcolorspace="RGB")
    tables, tile = abbreviate(stream)
    for photometric, transform in ((2, 0), (6, 1)):
        adobe = dict(segments(self_contained(tile, tables, photometric)))[0xEE]
        assert adobe[4:9] == b"Adobe" and adobe[-1] == transform
    assert self_contained(stream, None, 2) == stream  # complete, marked already: unchanged
    assert 0xEE not in dict(segments(self_contained(tile, tables, 1)))  # grey: nothing to say


def test_streams_that_are_not_jpeg_are_refused_with_what_was_seen():
    with pytest.raises(ValueError, match="not a JPEG stream"):
        self_contained(b"II*\x00", None, 2)
    with pytest.raises(ValueError, match="Photometric 5"):
        self_contained(b"\xff\xd8\xff\xd9", None, 5)
