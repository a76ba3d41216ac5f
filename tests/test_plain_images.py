"""Plain images (PNG, JPEG, BMP, WebP, GIF) through Pillow: read whole, by their signature."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import tilesegment as ts
from tilesegment.cli import main
from tilesegment.io.formats import plain

from conftest import small_unet


@pytest.fixture
def rgb():
    return np.random.default_rng(1).integers(0, 256, (150, 170, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".webp", ".tif"])
def test_lossless_files_read_as_their_pixels_and_segment_as_the_array(tmp_path, rgb, suffix):
    path = tmp_path / f"crop{suffix}"
    # .tif: a PNG under a TIFF name opens too (the signature decides, not the name)
    Image.fromarray(rgb).save(path, format="WEBP" if suffix == ".webp" else "PNG" if suffix == ".tif" else None,
                              **({"lossless": True} if suffix == ".webp" else {}))
    source = ts.open_image(path)
    assert source.format == ("webp" if suffix == ".webp" else "bmp" if suffix == ".bmp" else "png")
    assert source.plan_axes == "YX" and source.channels == 3 and source.pixel_size is None
    np.testing.assert_array_equal(source.read_region((0, 0), source.shape), rgb)
    net = small_unet()
    np.testing.assert_array_equal(ts.segment(path, net, tile_size=32, progress=False),
                                  ts.segment(rgb, net, tile_size=32, progress=False))


def test_jpeg_reads_as_pillow_decodes_it(tmp_path, rgb):
    path = tmp_path / "crop.jpg"
    Image.fromarray(rgb).save(path, quality=90)
    got = ts.open_image(path).read_region((0, 0), (150, 170))
    np.testing.assert_array_equal(got, np.asarray(Image.open(path)))  # JPEG's pixels, not the original's


def test_exif_orientation_is_applied(tmp_path, rgb):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    assert ts.open_image(path).shape == (170, 150)


def test_modes_grey_16_bit_palette_and_alpha(tmp_path, rgb):
    grey16 = (np.arange(60 * 70, dtype=np.uint16).reshape(60, 70) * 7)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    source = ts.open_image(tmp_path / "g16.png")
    assert source.dtype == np.uint16 and source.channels == 1
    np.testing.assert_array_equal(source.read_region((0, 0), (60, 70))[..., 0], grey16)

    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    assert ts.open_image(tmp_path / "p.png").channels == 3
    Image.fromarray(rgb[..., 0]).convert("LA").save(tmp_path / "la.png")
    assert ts.open_image(tmp_path / "la.png").channels == 1


def test_frames_of_an_animated_gif(tmp_path, rgb):
    frames = [Image.fromarray(np.full((20, 30), v, np.uint8)).convert("L") for v in (10, 200)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    second = ts.open_image(tmp_path / "a.gif", series=1).read_region((0, 0), (20, 30))
    assert second.mean() > 100
    with pytest.raises(ts.InputError, match="series 2 is out of range for a.gif: it has 2 frame"):
        ts.open_image(tmp_path / "a.gif", series=2)


def test_too_large_for_memory_is_refused_before_decoding(tmp_path, rgb, monkeypatch):
    Image.fromarray(rgb).save(tmp_path / "big.png")
    monkeypatch.setattr(plain, "MAX_DECODED_BYTES", 1000)
    with pytest.raises(ts.InputError, match=r"'big.png' is a 170 x 150 PNG .* over the .* convert it to a tiled "
                                            r"TIFF first, e.g. vips tiffsave big.png big.tif"):
        ts.open_image(tmp_path / "big.png")


def test_damaged_files_are_one_line_errors(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ts.InputError, match="cannot decode 'cut.png' .*truncated or damaged"):
        ts.open_image(tmp_path / "cut.png")
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ts.InputError, match="'fake.png' starts like a PNG file but Pillow cannot read it"):
        ts.open_image(tmp_path / "fake.png")


def test_cli_segments_a_png_and_info_names_the_reader(tmp_path, rgb, capsys):
    Image.fromarray(rgb).save(tmp_path / "crop.png")
    model = ts.save_model(small_unet(), tmp_path / "m.pt")
    assert main(["info", str(tmp_path / "crop.png")]) == 0
    out = capsys.readouterr().out
    assert "(png)" in out and "reader     plain" in out
    assert main(["segment", str(tmp_path / "crop.png"), str(tmp_path / "o.zarr"), "--model", str(model),
                 "--quiet"]) == 0
