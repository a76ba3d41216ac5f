"""The OpenSlide reader: generic TIFFs through OpenSlide against tifffile, routing, missing extra.

MRXS, VMS and iSyntax cannot be written by any pip package; real files are
tested when their path is given in ``TILESEGMENT_TEST_SLIDES`` (paths
separated by ``os.pathsep``), and that test skips otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import tilesegment as ts
from tilesegment.io.formats.openslide import open_slide
from tilesegment.registry import readers
from tilesegment.testing import assert_labels_match

from conftest import SHARED_SVS, small_unet

pytest.importorskip("openslide")


def _tiled_tiff(path: Path, rgb: np.ndarray) -> Path:
    """A tiled, pyramidal, deflate-compressed RGB TIFF: OpenSlide's generic-tiff format."""
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate((rgb, rgb[::2, ::2])):
            tif.write(level, tile=(64, 64), photometric="rgb", compression="zlib",
                      subfiletype=0 if k == 0 else 1)
    return path


@pytest.fixture
def rgb():
    return np.random.default_rng(4).integers(0, 256, (300, 410, 3), dtype=np.uint8)


def test_generic_tiff_through_openslide_equals_tifffile(tmp_path, rgb):
    path = _tiled_tiff(tmp_path / "g.tif", rgb)
    source = open_slide(path)
    assert source.shape == (300, 410) and source.chunk_shape == (64, 64) and source.format == "openslide generic-tiff"
    assert [lv.shape for lv in source.levels] == [(300, 410), (150, 205)]
    np.testing.assert_array_equal(source.read_region((0, 0), (300, 410)), rgb)
    np.testing.assert_array_equal(source.read_region((37, 101), (250, 333)), rgb[37:250, 101:333])
    np.testing.assert_array_equal(source.at_level(1).read_region((0, 0), (150, 205)), rgb[::2, ::2])
    net = small_unet()
    # the same pixels, so the same segmentation as through tifffile, tiled as the contract says
    reference = ts.segment(path, net, tile_size=64, mode="logits", progress=False)
    assert_labels_match(ts.segment(open_slide(path), net, tile_size=32, progress=False), reference)


def test_a_bif_goes_to_openslide_before_tifffile(tmp_path, rgb):
    path = _tiled_tiff(tmp_path / "slide.bif", rgb)
    assert readers.first(lambda r: r.can_open(str(path))).name == "openslide"
    source = ts.open_image(path)
    assert source.format.startswith("openslide")
    np.testing.assert_array_equal(source.read_region((0, 0), (300, 410)), rgb)


def test_a_bif_named_tif_is_told_by_its_ventana_xmp(tmp_path, rgb):
    bif = tmp_path / "scan.tif"  # scanners write BIFs as .tif too
    tifffile.imwrite(bif, rgb, tile=(64, 64), photometric="rgb",
                     extratags=[(700, "B", 0, b'<?xml version="1.0"?><iScan Magnification="40"/>', True)])
    plain = _tiled_tiff(tmp_path / "plain.tif", rgb)
    first = readers.first(lambda r: r.can_open(str(bif))).name
    assert (first, readers.first(lambda r: r.can_open(str(plain))).name) == ("openslide", "tiff")
    # Not a real BIF (no tile-joint metadata): OpenSlide's Ventana driver refuses it in one line,
    # where tifffile would have read it without the overlaps a real one has
    with pytest.raises(ts.InputError, match="OpenSlide cannot read 'scan.tif'"):
        ts.open_image(bif)


def test_missing_extra_and_unreadable_files_are_one_line(tmp_path, monkeypatch):
    fake = tmp_path / "case.mrxs"
    fake.write_text("[GENERAL]\n")
    with pytest.raises(ts.InputError, match="OpenSlide cannot read 'case.mrxs'"):
        ts.open_image(fake)
    monkeypatch.setitem(sys.modules, "openslide", None)  # as if the extra were not installed
    with pytest.raises(ts.InputError, match=r"'case.mrxs' needs OpenSlide: pip install 'tilesegment\[openslide\]'"):
        ts.open_image(fake)


@pytest.mark.skipif(not SHARED_SVS.exists(), reason="needs ../shared/data/small_HE.svs")
def test_the_real_svs_decodes_alike_through_openslide_and_tifffile():
    ours, theirs = ts.open_image(SHARED_SVS), open_slide(SHARED_SVS)
    assert ours.shape == theirs.shape and ours.pixel_size == pytest.approx(theirs.pixel_size)
    assert theirs.chunk_shape == ours.chunk_shape == (240, 240)
    # Both decode the JPEG tiles with libjpeg-turbo's default (exact integer) IDCT: the same pixels
    np.testing.assert_array_equal(theirs.read_region((1000, 1500), (1400, 1900)),
                                  ours.read_region((1000, 1500), (1400, 1900)))


_REAL = [p for p in os.environ.get("TILESEGMENT_TEST_SLIDES", "").split(os.pathsep) if p]


@pytest.mark.skipif(not _REAL, reason="set TILESEGMENT_TEST_SLIDES to real MRXS/VMS/BIF files to test them")
@pytest.mark.parametrize("path", _REAL or ["none"])
def test_real_slides(path):
    source = ts.open_image(path)
    assert source.channels == 3 and len(source.levels) >= 1
    y, x = (n // 2 for n in source.shape)
    crop = source.read_region((y, x), (y + 300, x + 300))
    net = small_unet()
    assert_labels_match(ts.segment(crop, net, tile_size=32, progress=False),
                        ts.segment(crop, net, tile_size=64, mode="logits", progress=False))
