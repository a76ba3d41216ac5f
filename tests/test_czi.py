"""The CZI reader: files written by pylibCZIrw (Zeiss's libCZI), read back subblock by subblock.

pylibCZIrw writes subblocks losslessly (zstd or uncompressed), so a CZI reads
as exactly the pixels it was written from, and segments as those pixels do
under the tiled == whole-image contract. It writes no pyramid subblocks, so
`_make_pyramid` turns subblocks it wrote into pyramid subblocks by editing
their directory entries (ZISRAW format: logical size = factor x stored size),
which libCZI then reads as the file's pyramid.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import tilesegment as ts
from tilesegment.registry import readers
from tilesegment.testing import assert_labels_match

from conftest import small_unet

pyczi = pytest.importorskip("pylibCZIrw.czi")

_ZSTD = "zstd1:ExplicitLevel=1;PreProcess=HiLoByteUnpack"


def _write(path: Path, planes: dict, edge: int, *, origin=(0, 0), scene: int = 0, writer=None,
           skip: tuple = ()) -> None:
    """Write each ``{plane: image}`` of `planes` as subblocks of `edge` pixels, leaving out the
    subblocks whose (row, column) is in `skip`; colour images are given as RGB, stored as BGR."""
    def put(w):
        for plane, image in planes.items():
            for y in range(0, image.shape[0], edge):
                for x in range(0, image.shape[1], edge):
                    if (y // edge, x // edge) in skip:
                        continue
                    block = image[y:y + edge, x:x + edge]
                    block = np.ascontiguousarray(block[..., ::-1] if block.ndim == 3 else block)
                    w.write(block, plane=dict(plane), location=(origin[1] + x, origin[0] + y), scene=scene,
                            compression_options=_ZSTD)
    if writer is not None:
        put(writer)
    else:
        with pyczi.create_czi(str(path), exist_ok=True) as w:
            put(w)


@pytest.fixture
def rgb():
    return np.random.default_rng(9).integers(0, 256, (300, 410, 3), dtype=np.uint8)


def test_a_brightfield_czi_reads_and_segments_as_its_pixels(tmp_path, rgb):
    path = tmp_path / "slide.czi"
    with pyczi.create_czi(str(path), exist_ok=True) as w:
        # a scene placed away from the origin, as a scanner places it on the slide
        _write(path, {(("C", 0),): rgb}, 128, origin=(5000, 7000), writer=w)
        w.write_metadata(document_name="slide", scale_x=0.25e-6, scale_y=0.25e-6)
    assert readers.first(lambda r: r.can_open(str(path))).name == "czi"
    source = ts.open_image(path)
    assert source.format == "czi" and source.axes == "YXS" and source.shape == (300, 410)
    assert source.chunk_shape == (128, 128) and source.pixel_size == pytest.approx((0.25, 0.25))
    np.testing.assert_array_equal(source.read_region((0, 0), (300, 410)), rgb)
    np.testing.assert_array_equal(source.read_region((37, 101), (250, 333)), rgb[37:250, 101:333])
    np.testing.assert_array_equal(source.read_chunk(2, 3), rgb[256:300, 384:410])

    net = small_unet()
    reference = ts.segment(rgb, net, tile_size=64, mode="logits", progress=False)
    assert_labels_match(ts.segment(path, net, tile_size=32, progress=False), reference)


def test_fluorescence_z_stack_with_scenes_and_a_gap(tmp_path):
    rng = np.random.default_rng(3)
    stack = rng.integers(0, 60000, (3, 2, 200, 260), dtype=np.uint16)  # C, Z, Y, X
    other = rng.integers(0, 60000, (3, 2, 90, 50), dtype=np.uint16)
    path = tmp_path / "stack.czi"
    with pyczi.create_czi(str(path), exist_ok=True) as w:
        _write(path, {(("C", c), ("Z", z)): stack[c, z] for c in range(3) for z in range(2)}, 128,
               origin=(100, 200), writer=w, skip={(1, 1)})
        _write(path, {(("C", c), ("Z", z)): other[c, z] for c in range(3) for z in range(2)}, 128,
               origin=(4000, 4000), scene=1, writer=w)
        w.write_metadata(document_name="stack", channel_names={0: "DAPI", 1: "GFP", 2: "RFP"},
                         scale_x=0.3e-6, scale_y=0.3e-6, scale_z=2e-6)
    source = ts.open_image(path, ndim=3)
    assert source.axes == "ZCYX" and source.plan_axes == "ZYX" and source.channels == 3
    assert source.shape == (2, 200, 260) and source.pixel_size == pytest.approx((2.0, 0.3, 0.3))
    assert source.chunk_shape == (1, 128, 128)
    expected = np.moveaxis(stack, 0, -1).copy()  # (Z, Y, X, C)
    expected[:, 128:256, 128:256] = 0  # no subblock there: fluorescence fill is 0
    np.testing.assert_array_equal(source.read_region((0, 0, 0), (2, 200, 260)), expected)
    second = ts.open_image(path, series=1, ndim=3)
    np.testing.assert_array_equal(second.read_region((0, 0, 0), (2, 90, 50)), np.moveaxis(other, 0, -1))
    with pytest.raises(ts.InputError, match=r"series 2 is out of range for stack.czi: it has 2 scene"):
        ts.open_image(path, series=2)

    net = ts.UNet(3, 2, base_channels=2, depth=1, ndim=3, pooling=[(1, 2, 2)]).eval()
    reference = ts.segment(expected, net, axes="ZYXC", tile_size=(2, 200, 260), mode="logits", progress=False)
    assert_labels_match(ts.segment(path, net, tile_size=(1, 32, 48), progress=False), reference)


def _make_pyramid(path: Path, last: int, factor: int) -> None:
    """Make the `last` subblocks written to the CZI at `path` pyramid subblocks of `factor`:
    their X and Y entries get a logical size `factor` times the stored one, in the subblock
    directory and in each subblock's own copy of its entry."""
    data = bytearray(path.read_bytes())
    segments, at = [], 0
    while at + 32 <= len(data):  # segment header: id (16 bytes), allocated size, used size
        segments.append((bytes(data[at:at + 16]).rstrip(b"\0"), at))
        at += 32 + struct.unpack_from("<q", data, at + 16)[0]

    def entry(offset: int, pyramid: bool) -> tuple[int, int]:
        """(file position, size in bytes) of the directory entry at `offset`; rewritten if `pyramid`."""
        assert data[offset:offset + 2] == b"DV"
        position, = struct.unpack_from("<q", data, offset + 6)
        dimensions, = struct.unpack_from("<i", data, offset + 28)
        if pyramid:
            data[offset + 22] = 1  # PyramidType: single subblock
            for k in range(dimensions):
                dim = offset + 32 + 20 * k  # name, start, size, start coordinate, stored size
                if bytes(data[dim:dim + 4]).rstrip(b"\0") in (b"X", b"Y"):
                    start, size, coordinate, _ = struct.unpack_from("<iifi", data, dim + 4)
                    struct.pack_into("<iifi", data, dim + 4, start, size * factor, coordinate, size)
        return position, 32 + 20 * dimensions

    pyramid = {p for name, p in segments if name == b"ZISRAWSUBBLOCK"}
    pyramid = set(sorted(pyramid)[-last:])
    for p in pyramid:
        entry(p + 48, True)  # after the header and the metadata, attachment and data sizes
    for name, p in segments:
        if name == b"ZISRAWDIRECTORY":
            offset = p + 32 + 128  # entry count, then 124 reserved bytes
            for _ in range(struct.unpack_from("<i", data, p + 32)[0]):
                position, size = entry(offset, False)
                if position in pyramid:
                    entry(offset, True)
                offset += size
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("factor", [2, 3])
def test_the_pyramid_subblocks_are_the_levels(tmp_path, factor):
    full = np.random.default_rng(factor).integers(0, 256, (600, 900, 3), dtype=np.uint8)
    coarse = full[::factor, ::factor].copy()
    path = tmp_path / "pyramid.czi"
    with pyczi.create_czi(str(path), exist_ok=True) as w:
        _write(path, {(("C", 0),): full}, 256, writer=w)
        # the coarse level's subblocks, each placed over the full-resolution area it covers
        blocks = 0
        for y in range(0, coarse.shape[0], 128):
            for x in range(0, coarse.shape[1], 128):
                w.write(np.ascontiguousarray(coarse[y:y + 128, x:x + 128, ::-1]), plane={"C": 0},
                        location=(x * factor, y * factor))
                blocks += 1
        w.write_metadata(document_name="pyramid", scale_x=0.25e-6, scale_y=0.25e-6)
    _make_pyramid(path, blocks, factor)

    source = ts.open_image(path)
    assert [lv.shape for lv in source.levels] == [(600, 900), (600 // factor, 900 // factor)]
    assert source.levels[1].pixel_size == pytest.approx((0.25 * factor,) * 2)
    np.testing.assert_array_equal(source.read_region((0, 0), (600, 900)), full)  # level 0 unchanged
    level = ts.open_image(path, level=1)
    assert level.chunk_shape == (128, 128) and level.pixel_size == pytest.approx((0.25 * factor,) * 2)
    np.testing.assert_array_equal(level.read_region((0, 0), level.shape), coarse)
    rng = np.random.default_rng(0)
    for _ in range(60):  # any region of the level is the stored pixels, none shifted
        y0, x0 = rng.integers(0, coarse.shape[0]), rng.integers(0, coarse.shape[1])
        y1, x1 = rng.integers(y0 + 1, coarse.shape[0] + 1), rng.integers(x0 + 1, coarse.shape[1] + 1)
        np.testing.assert_array_equal(level.read_region((y0, x0), (y1, x1)), coarse[y0:y1, x0:x1])
    np.testing.assert_array_equal(source.at_level(1).read_chunk(1, 1), coarse[128:256, 128:256])
    # --mpp at the coarse level's pixel size reads that level, not full resolution resampled
    np.testing.assert_array_equal(ts.open_image(path, mpp=0.25 * factor).read_region((0, 0), coarse.shape[:2]),
                                  coarse)


def test_missing_extra_and_damaged_files_are_one_line(tmp_path, monkeypatch):
    broken = tmp_path / "broken.czi"
    broken.write_bytes(b"ZISRAWFILE" + b"\0" * 200)
    with pytest.raises(ts.InputError, match="pylibCZIrw cannot read 'broken.czi'"):
        ts.open_image(broken)
    monkeypatch.setitem(sys.modules, "pylibCZIrw", None)  # as if the extra were not installed
    with pytest.raises(ts.InputError, match=r"'broken.czi' is a Zeiss CZI: pip install 'tilesegment\[czi\]'"):
        ts.open_image(broken)
