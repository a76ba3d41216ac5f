import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import tilesegment as ts
from tilesegment._probe import probe_geometry


def test_default_unet_reproduces_the_paper_572_to_388():
    net = ts.UNet(in_channels=1, num_classes=2)
    geom = ts.Geometry.of(net)
    assert (geom.halo, geom.step) == ((92, 92), (16, 16))
    assert geom.output_size(572) == (388, 388)
    assert net(torch.empty(1, 1, 572, 572, device="meta")).shape[-2:] == (388, 388)
    assert geom.input_size(512) == (700, 700)


@pytest.mark.parametrize("depth", [0, 1, 2, 3, 4])
def test_analytic_geometry_equals_meta_probe(depth):
    net = ts.UNet(2, 3, base_channels=2, depth=depth)
    assert probe_geometry(net) == net.geometry


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(0, 4), k=st.integers(0, 40), j=st.integers(0, 40))
def test_unet_output_size_matches_geometry_for_valid_sizes(depth, k, j):
    net = ts.UNet(1, 2, base_channels=2, depth=depth)
    geom = net.geometry
    n = (geom.min_input[0] + k * geom.step[0], geom.min_input[1] + j * geom.step[1])
    out = net(torch.empty(1, 1, *n, device="meta"))
    assert tuple(out.shape[-2:]) == geom.output_size(n)


def test_tile_size_not_multiple_of_step_names_nearest_valid():
    geom = ts.UNet(3, 2).geometry
    with pytest.raises(ts.InvalidTileSize, match="tile_size 100 is not a multiple of the network step 16; nearest valid: 96 or 112"):
        geom.check_tile_size(100)
    with pytest.raises(ts.InvalidTileSize, match="must be positive"):
        geom.check_tile_size(0)


def test_invalid_input_size_names_nearest_valid_inputs():
    geom = ts.UNet(3, 2).geometry
    with pytest.raises(ts.InvalidTileSize, match="nearest valid: 572 or 588"):
        geom.output_size(575)


@given(n=st.integers(1, 3000), halo=st.integers(0, 120), step=st.sampled_from([1, 2, 4, 8, 16, 32]))
def test_input_size_is_smallest_valid_input_covering_tile_and_halo(n, halo, step):
    geom = ts.Geometry(halo=halo, step=step, shrink=2 * halo, min_input=2 * halo + step)
    n_in = geom.input_size(n)[0]
    assert geom.is_valid_input(n_in)
    assert geom.output_size(n_in)[0] >= n and n_in >= n + 2 * halo
    assert not (n_in - step >= n + 2 * halo and geom.is_valid_input(n_in - step))


class SameConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        return self.up(self.pool(self.conv(x)))


def test_same_padded_network_must_declare_its_context_margin():
    net = SameConvNet()
    with pytest.raises(ts.ModelError, match="pads internally.*step=2"):
        ts.Geometry.of(net)
    net.geometry = ts.Geometry(halo=8, step=2)
    assert ts.Geometry.of(net).crop == (8, 8)
    image = np.random.default_rng(0).random((37, 41, 2)).astype(np.float32)
    out = ts.segment(image, net, tile_size=16, mode="logits", axes="YXC", progress=False)
    assert out.shape == (3, 37, 41)


def test_probe_of_plain_valid_conv_stack():
    net = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.Conv2d(4, 2, 3))
    geom = ts.Geometry.of(net)
    assert geom.halo == (3, 3) and geom.step == (1, 1) and geom.shrink == (6, 6)


def test_probe_rejects_a_model_whose_output_does_not_grow_with_input():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(4))
    with pytest.raises(ts.ModelError, match="does not grow"):
        ts.Geometry.of(net)


def test_declared_geometry_crops_halo_of_same_network():
    geom = ts.Geometry(halo=16, step=8)
    assert geom.crop == (16, 16) and geom.input_size(64) == (96, 96)
    with pytest.raises(ts.ModelError, match="shrink"):
        ts.Geometry(halo=2, step=1, shrink=8)


@settings(max_examples=100, deadline=None)
@given(halo=st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(0, 30)),
       step=st.tuples(st.sampled_from([1, 2, 4]), st.sampled_from([1, 4, 16]), st.sampled_from([1, 4, 16])),
       tiles=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)))
def test_volume_geometry_is_the_image_arithmetic_per_axis(halo, step, tiles):
    # A 3-D geometry answers, axis by axis, what a 2-D geometry of that axis's halo and step does.
    shrink = tuple(2 * h for h in halo)
    vol = ts.Geometry(halo=halo, step=step, shrink=shrink)
    tile = tuple(t * s for t, s in zip(tiles, step))
    n_in = vol.input_size(tile)
    for axis in range(3):
        flat = ts.Geometry(halo=halo[axis], step=step[axis], shrink=shrink[axis])
        assert n_in[axis] == flat.input_size(tile[axis])[0]
        assert vol.output_size(n_in)[axis] == flat.output_size(n_in[axis])[0]
    assert vol.ndim == 3 and vol.check_tile_size(tile) == tile


def test_geometry_axes_must_agree():
    with pytest.raises(ts.ModelError, match="axes disagree"):
        ts.Geometry(halo=(4, 4, 4), step=(8, 8))
    with pytest.raises(ts.InvalidTileSize, match=r"3 ints \(z, y, x\)"):
        ts.Geometry(halo=4, step=8, ndim=3).check_tile_size((64, 64))
