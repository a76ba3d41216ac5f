import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import tilesegment as ts
from tilesegment.testing import assert_exact

from conftest import small_unet


def test_checkpoint_round_trip_keeps_weights_config_and_normalization(tmp_path):
    net = ts.UNet(3, 4, base_channels=4, depth=2, normalization=((0.1, 0.2, 0.3), (1.0, 2.0, 3.0)))
    path = ts.save_model(net, tmp_path / "m.pt", trained_on="synthetic")
    loaded = ts.load_model(path)
    assert loaded.config == net.config and loaded.normalization == net.normalization
    assert loaded.metadata == {"trained_on": "synthetic"}
    x = torch.rand(1, 3, 60, 60)
    torch.testing.assert_close(loaded(x), net.eval()(x))


def test_torchscript_file_loads_and_is_probed(tmp_path):
    net = small_unet(3, 2, base=2, depth=2)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    loaded = ts.load_model(path)
    assert ts.Geometry.of(loaded) == net.geometry
    image = np.random.default_rng(0).random((40, 30, 3)).astype(np.float32)
    a = ts.segment(image, loaded, tile_size=16, mode="logits", progress=False)
    b = ts.segment(image, net, tile_size=16, mode="logits", progress=False)
    assert_exact(a, b)


def test_factory_spec_imports_and_calls(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "import tilesegment as ts\ndef build():\n    return ts.UNet(1, 2, base_channels=2, depth=1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = ts.load_model("mynets:build")
    assert model.config["in_channels"] == 1
    sys.modules.pop("mynets", None)


def test_dotted_factory_loads_from_the_api_and_from_the_cli_in_the_working_folder(tmp_path, monkeypatch, rgb_tiff):
    from tilesegment.cli import main

    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        "import tilesegment as ts\ndef build():\n    return ts.UNet(3, 2, base_channels=2, depth=1)\n")
    monkeypatch.chdir(tmp_path)  # as a user in their project folder; nothing on sys.path yet
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert ts.load_model("mypkg.nets:build").config["in_channels"] == 3
        assert main(["segment", str(rgb_tiff), str(tmp_path / "o.zarr"), "--model", "mypkg.nets:build",
                     "--tile-size", "32", "--quiet"]) == 0
    finally:
        for name in ("mypkg", "mypkg.nets"):
            sys.modules.pop(name, None)


def test_a_whole_pickled_module_is_one_line_that_says_how_to_save_it(tmp_path, capsys, rgb_tiff):
    from tilesegment.cli import main

    torch.save(small_unet(), tmp_path / "full.pt")  # the module itself, not a state dict
    with pytest.raises(ts.ModelError, match=r"whole pickled module .*ts.save_model"):
        ts.load_model(tmp_path / "full.pt")
    assert main(["segment", str(rgb_tiff), str(tmp_path / "o.zarr"), "--model", str(tmp_path / "full.pt")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "ts.save_model" in err


@pytest.mark.parametrize(
    "content,match",
    [(None, "not found"), (b"hello", "not a PyTorch checkpoint"), ("dict", "not a tilesegment checkpoint")],
)
def test_bad_model_files_are_model_errors(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    if content == "dict":
        torch.save({"weights": torch.zeros(2)}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ts.ModelError, match=match):
        ts.load_model(path)


def test_bad_factory_is_a_model_error():
    with pytest.raises(ts.ModelError, match="cannot import model factory"):
        ts.load_model("no_such_package_xyz:build")


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(0, 3), data=st.data())
def test_volume_unet_geometry_is_what_the_network_does_per_axis(depth, data):
    from tilesegment._probe import _meta_runner, _output_shape, model_in_channels

    pooling = [data.draw(st.tuples(*[st.sampled_from([1, 2])] * 3)) for _ in range(depth)]
    net = ts.UNet(2, 3, base_channels=2, depth=depth, ndim=3, pooling=pooling)
    geom = net.geometry
    assert model_in_channels(net) == 2
    run = _meta_runner(net)
    for extra in [(0, 0, 0), (1, 0, 2), (3, 1, 0)]:
        n_in = tuple(m + k * st_ for m, k, st_ in zip(geom.min_input, extra, geom.step))
        assert _output_shape(run, 2, *n_in) == (1, 3, *geom.output_size(n_in))
    # An input off the step grid on an axis with pooling is refused by the network too.
    for axis in range(3):
        if geom.step[axis] > 1:
            n_in = list(geom.min_input)
            n_in[axis] += 1
            shape = _output_shape(run, 2, *n_in)
            assert shape is None or shape[2 + axis] != geom.output_size(geom.min_input)[axis] + 1


def test_volume_unet_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = ts.UNet(1, 2, base_channels=2, depth=2, ndim=3, pooling=[(1, 2, 2), (2, 2, 2)]).eval()
    path = ts.save_model(net, tmp_path / "vol.pt")
    back = ts.load_model(path)
    assert back.geometry == net.geometry
    x = torch.rand(1, 1, *net.geometry.input_size((2, 4, 4)))
    with torch.no_grad():
        torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)


def test_default_unet_config_and_state_are_unchanged_by_volume_support():
    net = ts.UNet(3, 2, base_channels=4, depth=2)
    assert set(net.config) == {"in_channels", "num_classes", "base_channels", "depth"}
    assert not any(k.startswith("pool") for k in net.state_dict())  # pooling has no parameters
    with pytest.raises(ts.ModelError, match="pooling"):
        ts.UNet(1, 2, depth=2, ndim=3, pooling=[(1, 2, 2)])


@settings(max_examples=20, deadline=None)
@given(ndim=st.sampled_from([2, 3]), depth=st.integers(0, 3), channels=st.integers(1, 4),
       classes=st.integers(1, 4), base=st.integers(1, 4), data=st.data())
def test_unet_activation_bytes_equal_the_meta_probe(ndim, depth, channels, classes, base, data):
    from tilesegment.executor import estimate_bytes_per_tile

    pooling = data.draw(st.lists(st.tuples(*[st.sampled_from([1, 2])] * ndim), min_size=depth, max_size=depth))
    net = ts.UNet(channels, classes, base_channels=base, depth=depth, ndim=ndim, pooling=pooling)
    geom = net.geometry
    extra = data.draw(st.tuples(*[st.integers(0, 3)] * ndim))
    size = tuple(m + k * s for m, k, s in zip(geom.min_input, extra, geom.step))
    assert net.activation_bytes(size) == estimate_bytes_per_tile(net, channels, size, analytic=False)
