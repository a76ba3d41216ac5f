"""Tissue detection: cheap, on a small picture, and skipping exactly the tiles away from tissue."""

import numpy as np
import tifffile
from hypothesis import given, settings, strategies as st

import tilesegment as ts
from tilesegment.tissue import _morph, detect_tissue


def brute_morph(mask: np.ndarray, radius: int, dilate: bool) -> np.ndarray:
    padded = np.pad(mask, radius, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * radius + 1,) * 2)
    return windows.any(axis=(2, 3)) if dilate else windows.all(axis=(2, 3))


@settings(max_examples=60, deadline=None)
@given(ny=st.integers(1, 30), nx=st.integers(1, 30), radius=st.integers(0, 12),
       dilate=st.booleans(), seed=st.integers(0, 2**16))
def test_square_morphology_equals_a_sliding_window(ny, nx, radius, dilate, seed):
    mask = np.random.default_rng(seed).random((ny, nx)) < 0.3
    np.testing.assert_array_equal(_morph(mask, radius, dilate), brute_morph(mask, radius, dilate))


@settings(max_examples=60, deadline=None)
@given(ny=st.integers(1, 120), nx=st.integers(1, 120), tile=st.integers(1, 6), margin=st.integers(0, 9),
       seed=st.integers(0, 2**16))
def test_a_tile_touches_the_mask_iff_a_mask_pixel_lies_within_margin_of_its_own_pixels(
    ny, nx, tile, margin, seed
):
    plan = ts.TilePlan.build((ny, nx), ts.Geometry(halo=3, step=4), 4 * tile, chunk_size=4 * tile)
    mask = np.random.default_rng(seed).random((ny, nx)) < 0.02
    touching = plan.tiles_touching(mask, margin=margin)
    for t in plan.tiles():
        y0, x0 = max(0, t.origin[0] - margin), max(0, t.origin[1] - margin)
        window = mask[y0 : t.origin[0] + t.size[0] + margin, x0 : t.origin[1] + t.size[1] + margin]
        assert touching[t.index] == window.any()


def test_overview_reads_a_thumbnail_series_not_the_slide(tmp_path):
    rng = np.random.default_rng(0)
    slide = rng.integers(0, 256, (1024, 768, 3), dtype=np.uint8)
    thumb = rng.integers(0, 256, (256, 192, 3), dtype=np.uint8)  # unrelated pixels, same aspect
    label = rng.integers(0, 256, (100, 300, 3), dtype=np.uint8)  # other aspect: not a picture of it
    path = tmp_path / "slide.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(slide, tile=(256, 256), photometric="rgb", compression="zlib")
        tif.write(thumb, photometric="rgb")
        tif.write(label, photometric="rgb")
    source = ts.open_image(path)
    np.testing.assert_array_equal(source.overview(128), thumb[::2, ::2])
    np.testing.assert_array_equal(source.overview(512), slide[::2, ::2])  # the thumbnail is too small


def test_real_slide_is_detected_on_its_thumbnail_never_reading_the_full_resolution(shared_svs, monkeypatch):
    from tilesegment.io.sources import ImageSource

    source = ts.open_image(shared_svs)
    read_shapes, original = [], ImageSource.read
    monkeypatch.setattr(ImageSource, "read", lambda self, *a, **k: read_shapes.append(self.shape) or original(self, *a, **k))
    mask = detect_tissue(source)
    assert read_shapes and all(max(shape) <= 1024 for shape in read_shapes)  # not the 2967 x 2220 slide
    # About 8 um per mask pixel: 256 px over the slide's 2967 x 0.499 um, from the 768-px thumbnail.
    assert mask.shape == (256, 192)
    assert 0.2 < mask.mean() < 0.8


def test_mostly_glass_slide_computes_only_the_tiles_near_its_tissue():
    rgb = np.full((1024, 1024, 3), 235, np.uint8)  # glass
    rgb[100:260, 600:760] = (150, 60, 140)  # one piece of stained tissue
    net = ts.UNet(3, 2, base_channels=2, depth=2)
    job = ts.prepare(rgb, net, tile_size=128, tissue_mask="auto")
    # The dilated piece spans at most 3 x 3 of the 8 x 8 tiles.
    assert 1 <= job.tissue.sum() <= 9
