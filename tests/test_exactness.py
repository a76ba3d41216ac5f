"""The signature property: tiled output equals whole-image inference for every valid tile size."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import tilesegment as ts
from tilesegment.testing import assert_exact, assert_labels_match, relative_error, whole_image_logits

from conftest import small_unet

NETS = {(c, d): small_unet(c, 3, base=4, depth=d, seed=c + 10 * d) for c in (1, 2, 3, 4) for d in (1, 2)}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channels=st.integers(1, 4),
    depth=st.integers(1, 2),
    height=st.integers(1, 90),
    width=st.integers(1, 90),
    tile_steps=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    dtype=st.sampled_from(["uint8", "uint16", "float32"]),
    seed=st.integers(0, 2**16),
)
def test_tiled_equals_whole_image_for_any_tile_multiple_of_step(
    channels, depth, height, width, tile_steps, dtype, seed
):
    net = NETS[(channels, depth)]
    rng = np.random.default_rng(seed)
    if dtype == "float32":
        image = rng.normal(size=(channels, height, width)).astype(np.float32)
    else:
        image = rng.integers(0, np.iinfo(dtype).max, size=(channels, height, width)).astype(dtype)
    step = net.geometry.step[0]
    tile = (tile_steps[0] * step, tile_steps[1] * step)
    expected = whole_image_logits(image, net, axes="CYX")
    tiled = ts.segment(image, net, tile_size=tile, mode="logits", axes="CYX", progress=False)
    assert tiled.shape == expected.shape == (3, height, width)
    assert_exact(tiled, expected)


def test_paper_depth4_network_is_exact_across_tile_sizes_and_batches():
    net = small_unet(3, 2, base=4, depth=4, seed=3)
    image = np.random.default_rng(0).integers(0, 256, (203, 150, 3), dtype=np.uint8)
    expected = whole_image_logits(image, net)
    for tile, batch in [(16, 5), (48, 3), (64, 1), (112, 2), (256, 1)]:
        tiled = ts.segment(image, net, tile_size=tile, batch_size=batch, mode="logits", progress=False)
        assert_exact(tiled, expected, what=f"tile {tile}, batch {batch}")


def test_one_pixel_image_with_halo_far_larger_than_the_image():
    net = small_unet(3, 2, base=2, depth=4)
    image = np.array([[[10, 200, 30]]], np.uint8)
    expected = whole_image_logits(image, net)
    tiled = ts.segment(image, net, tile_size=16, mode="logits", progress=False)
    assert_exact(tiled, expected)


def test_tile_origins_off_the_step_grid_would_leave_seams():
    """Why the rule matters: shifting inputs by half a step changes the pooling phase."""
    net = small_unet(1, 2, base=4, depth=2, seed=5)
    image = np.random.default_rng(2).random((64, 64)).astype(np.float32)
    geom = net.geometry
    shifted = ts.Geometry(halo=geom.halo[0] + 2, step=geom.step, min_input=geom.min_input, shrink=geom.shrink)
    expected = whole_image_logits(image, net)
    bad = whole_image_logits(image, net, geometry=shifted)
    assert relative_error(bad, expected) > 1e-3


@pytest.mark.parametrize("mode", ["labels", "probabilities"])
def test_labels_and_probabilities_are_reductions_of_the_exact_logits(mode):
    net = NETS[(3, 2)]
    image = np.random.default_rng(4).integers(0, 256, (77, 91, 3), dtype=np.uint8)
    logits = whole_image_logits(image, net)
    out = ts.segment(image, net, tile_size=24, mode=mode, progress=False)
    if mode == "labels":
        assert out.dtype == np.uint8 and out.shape == (77, 91)
        assert_labels_match(out, logits)
    else:
        e = np.exp(logits - logits.max(0))
        expected = np.round(e / e.sum(0) * 255)
        assert out.dtype == np.uint8 and out.shape == (3, 77, 91)
        assert np.abs(out.astype(int) - expected).max() <= 1
