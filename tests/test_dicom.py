"""The DICOM WSI reader: slides converted by wsidicomizer from TIFFs, read back through wsidicom.

Round trips through a lossless encoding give the TIFF's pixels exactly, so
segmentation is the TIFF's segmentation under the tiled == whole-image
contract. The real SVS is converted with its JPEG tiles copied, not
re-encoded, so its DICOM gives the SVS's pixels and segmentation exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import tilesegment as ts
from tilesegment.registry import readers
from tilesegment.testing import assert_labels_match

from conftest import small_unet

pytest.importorskip("wsidicom")
wsidicomizer = pytest.importorskip("wsidicomizer")


def _dicomize(source: Path, folder: Path, **options) -> Path:
    """`source` converted to a DICOM WSI folder by wsidicomizer, with no label or overview."""
    folder.mkdir()
    wsidicomizer.WsiDicomizer.convert(source, folder, include_label=False, include_overview=False,
                                      include_thumbnail=False, **options)
    return folder


@pytest.fixture
def rgb():
    return np.random.default_rng(7).integers(0, 256, (300, 410, 3), dtype=np.uint8)


@pytest.fixture
def tiff(tmp_path, rgb) -> Path:
    """A tiled, deflate-compressed RGB TIFF at 0.5 um/px."""
    path = tmp_path / "g.tif"
    tifffile.imwrite(path, rgb, tile=(64, 64), photometric="rgb", compression="zlib",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    return path


@pytest.fixture
def dicom(tmp_path, tiff) -> Path:
    from wsidicom.codec import JpegLosslessSettings
    from wsidicom.codec.settings import Channels

    # JPEG lossless on RGB samples: the TIFF's pixels, exactly; a pyramid of 4 levels
    return _dicomize(tiff, tmp_path / "slide", tile_size=64, add_missing_levels=True,
                     encoding=JpegLosslessSettings(channels=Channels.RGB))


def test_a_dicom_folder_reads_as_the_tiff_it_was_made_from(dicom, tiff, rgb):
    assert readers.first(lambda r: r.can_open(str(dicom))).name == "dicom"
    source = ts.open_image(dicom)
    assert source.format == "dicom" and source.plan_axes == "YX" and source.channels == 3
    assert source.shape == (300, 410) and source.chunk_shape == (64, 64)
    assert source.pixel_size == pytest.approx((0.5, 0.5))
    assert [lv.shape for lv in source.levels][:3] == [(300, 410), (150, 205), (75, 103)]
    assert source.levels[1].pixel_size == pytest.approx((1.0, 1.0))
    np.testing.assert_array_equal(source.read_region((0, 0), (300, 410)), rgb)
    np.testing.assert_array_equal(source.read_region((37, 101), (250, 333)), rgb[37:250, 101:333])
    # a stored frame, decoded once, clipped at the image's edge
    np.testing.assert_array_equal(source.read_chunk(4, 6), rgb[256:300, 384:410])
    coarse = source.at_level(1)
    assert coarse.shape == (150, 205) and coarse.read_region((0, 0), (150, 205)).shape == (150, 205, 3)

    net = small_unet()
    reference = ts.segment(tiff, net, tile_size=64, mode="logits", progress=False)
    assert_labels_match(ts.segment(dicom, net, tile_size=32, progress=False), reference)


def test_one_instance_file_opens_on_its_own(dicom, rgb):
    files = sorted(dicom.iterdir(), key=lambda p: -p.stat().st_size)  # the largest is level 0
    source = ts.open_image(files[0])
    assert source.format == "dicom" and source.shape == (300, 410) and len(source.levels) == 1
    np.testing.assert_array_equal(source.read_region((0, 0), (300, 410)), rgb)


def _make_sparse(instance: Path, missing: tuple[int, int]) -> None:
    """Rewrite a TILED_FULL instance with uncompressed frames as TILED_SPARSE, leaving out
    the frame at tile (row, column) `missing`, as a scanner leaves out background."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(instance)
    rows, columns = int(ds.Rows), int(ds.Columns)
    per_row = -(-int(ds.TotalPixelMatrixColumns) // columns)
    frame_bytes = rows * columns * int(ds.SamplesPerPixel) * int(ds.BitsAllocated) // 8
    frames, positions = [], []
    for k in range(int(ds.NumberOfFrames)):
        tile = divmod(k, per_row)
        if tile == missing:
            continue
        frames.append(ds.PixelData[k * frame_bytes:(k + 1) * frame_bytes])
        position = Dataset()
        position.RowPositionInTotalImagePixelMatrix = tile[0] * rows + 1
        position.ColumnPositionInTotalImagePixelMatrix = tile[1] * columns + 1
        position.XOffsetInSlideCoordinateSystem = 0.0
        position.YOffsetInSlideCoordinateSystem = 0.0
        position.ZOffsetInSlideCoordinateSystem = 0.0
        item = Dataset()
        item.PlanePositionSlideSequence = Sequence([position])
        positions.append(item)
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.PerFrameFunctionalGroupsSequence = Sequence(positions)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = b"".join(frames)
    ds.save_as(instance)


def test_frames_a_sparse_slide_leaves_out_are_white(tmp_path, tiff, rgb):
    from wsidicom.codec import NumpySettings

    folder = _dicomize(tiff, tmp_path / "sparse", tile_size=64, encoding=NumpySettings())
    (instance,) = folder.iterdir()
    _make_sparse(instance, missing=(1, 2))
    source = ts.open_image(folder)
    got = source.read_region((0, 0), (300, 410))
    expected = rgb.copy()
    expected[64:128, 128:192] = 255  # the blank tile of a colour slide, as the standard implies
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(source.read_chunk(1, 2), np.full((64, 64, 3), 255, np.uint8))


def test_errors_are_one_line(tmp_path, dicom, monkeypatch):
    with pytest.raises(ts.InputError, match=r"series 1 is out of range for slide: it has 1 optical path"):
        ts.open_image(dicom, series=1)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 40)
    with pytest.raises(ts.InputError, match="wsidicom cannot read the DICOM slide 'broken.dcm'"):
        ts.open_image(broken)
    monkeypatch.setitem(sys.modules, "wsidicom", None)  # as if the extra were not installed
    with pytest.raises(ts.InputError, match=r"'slide' is a DICOM slide: pip install 'tilesegment\[dicom\]'"):
        ts.open_image(dicom)


def test_the_real_svs_as_dicom_segments_as_the_svs(tmp_path, shared_svs):
    pytest.importorskip("turbojpeg")
    try:  # wsidicomizer copies the SVS's JPEG tiles through opentile, which needs libturbojpeg
        folder = _dicomize(shared_svs, tmp_path / "svs", tile_size=240)
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"opentile cannot convert the SVS here: {exc}")
    ours, svs = ts.open_image(folder), ts.open_image(shared_svs)
    assert ours.shape == svs.shape and ours.chunk_shape == svs.chunk_shape == (240, 240)
    assert ours.pixel_size == pytest.approx(svs.pixel_size, rel=1e-3)
    np.testing.assert_array_equal(ours.read_region((0, 0), ours.shape), svs.read_region((0, 0), svs.shape))
    net = small_unet()
    np.testing.assert_array_equal(ts.segment(folder, net, tile_size=256, progress=False),
                                  ts.segment(shared_svs, net, tile_size=256, progress=False))
