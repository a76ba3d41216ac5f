import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import tilesegment as ts
from tilesegment.testing import assert_exact, whole_image_logits

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


# -- the Model contract, the loaders, the meta-device trace ----------------------------


class _Scripted(torch.nn.Module):
    """A Python wrapper around a TorchScript network, as a bioimage.io package with TorchScript weights."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x):
        return self.network(x)


def test_describe_gives_a_plain_module_the_model_facts_and_keeps_native_backends():
    from tilesegment.contracts import Model
    from tilesegment.models import ProbedModel, describe

    net = ts.UNet(3, 2, base_channels=4, depth=2)
    assert describe(net) is net and isinstance(net, Model)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3))
    plain.normalization = ([0.5] * 3, [0.2] * 3)
    model = describe(plain)
    assert isinstance(model, ProbedModel) and isinstance(model, Model)
    assert (model.geometry.halo, model.in_channels, model.num_classes) == ((2, 2), 3, 5)
    assert model.normalization == plain.normalization and model.metadata == {}
    assert describe(model) is model
    with pytest.raises(ts.ModelError, match="torch.nn.Module"):
        describe("not a module")


def test_identity_is_the_manifest_hash_of_today_for_every_kind_of_model():
    import hashlib

    from tilesegment.io.manifest import model_hash
    from tilesegment.models import describe

    def hash_of_before(module):  # io.manifest.model_hash as it was before the Model contract
        digest = hashlib.sha256(type(module).__name__.encode())
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    net = small_unet(seed=3)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3))
    for module in (net, plain, torch.jit.script(net), ts.PlaneWise(net, 1)):
        assert describe(module).identity() == model_hash(module) == hash_of_before(module)
    assert ts.UNet(3, 3, base_channels=4, depth=2).identity() != net.identity()


def test_a_third_party_backend_that_states_the_facts_is_used_as_is():
    from tilesegment.contracts import Model
    from tilesegment.models import ModelBase, describe

    class Mean(ModelBase):  # a 3x3 mean filter, one class
        geometry = ts.Geometry(halo=1, step=1, shrink=2)
        in_channels, num_classes = 1, 1

        def forward(self, x):
            return torch.nn.functional.avg_pool2d(x, 3, stride=1)

    model = Mean()
    assert describe(model) is model and isinstance(model, Model)
    image = np.random.default_rng(0).random((40, 36)).astype(np.float32)
    out = ts.segment(image, model, tile_size=16, mode="logits", device="cpu", precision="fp32", progress=False)
    ref = torch.nn.functional.avg_pool2d(torch.from_numpy(np.pad(image, 1, mode="reflect"))[None, None], 3, stride=1)
    assert_exact(out[0], ref[0, 0].numpy())


def test_trace_handles_torchscript_whole_and_as_a_part_without_touching_the_weights():
    from tilesegment._probe import ScriptedPart, trace
    from tilesegment.executor import estimate_bytes_per_tile

    net = small_unet(seed=1)
    scripted = torch.jit.script(net)
    wrapped = _Scripted(scripted)
    size = net.geometry.input_size(16)
    before = {k: v.clone() for k, v in scripted.state_dict().items()}
    layers = []
    out = trace(wrapped, (1, 3, *size), lambda layer, inputs, output: layers.append(layer))
    assert out.shape == (1, 3, 16, 16) and out.device.type == "meta"
    assert len(layers) == 1 and isinstance(layers[0], ScriptedPart) and layers[0].original is scripted
    assert wrapped.network is scripted  # put back after the trace
    for k, v in scripted.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, before[k])
    # A TorchScript part counts as 64 float maps of its input, as a whole TorchScript model does.
    expected = 64 * 3 * size[0] * size[1] * 4
    assert estimate_bytes_per_tile(scripted, 3, size) == expected
    assert estimate_bytes_per_tile(wrapped, 3, size) == expected
    traced = _Scripted(torch.jit.trace(net, torch.zeros(1, 3, *size)))
    assert estimate_bytes_per_tile(traced, 3, size) == expected  # was 0: hooks inside never fired


def test_a_model_with_torchscript_children_runs_with_a_memory_budget_and_equals_whole_image():
    from tilesegment.executor import Executor

    net = small_unet(seed=2)
    model = _Scripted(torch.jit.script(net))
    geom = net.geometry
    executor = Executor(model, "cpu", precision="fp32", geometry=geom, tile_size=(16, 16), memory_budget=1 << 30)
    assert executor.bytes_per_tile > 0
    image = np.random.default_rng(5).integers(0, 256, (50, 44, 3), dtype=np.uint8)
    out = ts.segment(image, model, tile_size=16, mode="logits", device="cpu", precision="fp32",
                     memory_budget=1 << 30, progress=False)
    assert_exact(out, whole_image_logits(image, net))


def test_executors_replicate_a_torchscript_model_and_leave_the_callers_alone():
    from tilesegment.executor import Executor

    scripted = torch.jit.script(small_unet(seed=4))
    before = {k: (v.clone(), v.data_ptr(), v.stride()) for k, v in scripted.state_dict().items()}
    first, second = Executor(scripted, "cpu"), Executor(scripted, "cpu")
    models = [first.model.module, second.model.module]
    assert models[0] is not models[1] and scripted not in models
    for name, (value, pointer, stride) in before.items():
        now = scripted.state_dict()[name]
        assert now.device.type == "cpu" and now.data_ptr() == pointer and now.stride() == stride
        assert torch.equal(now, value)
        assert models[0].state_dict()[name].data_ptr() != models[1].state_dict()[name].data_ptr()
    # The executors' copies are channels-last, as for Python modules.
    weight = next(p for p in models[0].parameters() if p.ndim == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    x = np.random.default_rng(0).random((1, 3, 68, 68), dtype=np.float32)
    np.testing.assert_array_equal(first(x).numpy(), second(x).numpy())


def test_model_loaders_are_registered_and_asked_in_priority_order():
    from tilesegment.registry import model_loaders

    ours = ["module", "demo", "bioimageio", "onnx", "torch-file", "factory"]
    assert [name for name in model_loaders.names() if name in ours] == ours
    for loader in model_loaders:
        for spec in (None, 3, "", "\0", "x" * 5000, object()):
            assert loader.can_load(spec) in (True, False)  # cheap, and never raises


class ZooLoader:
    name, priority = "zoo", 5

    def can_load(self, spec):
        return isinstance(spec, str) and spec.startswith("zoo://")

    def load(self, spec):
        return ts.UNet(1, 2, base_channels=2, depth=1).eval()


def test_a_loader_registered_by_hand_is_used():
    from tilesegment.registry import model_loaders

    model_loaders.register("zoo", ZooLoader())
    try:
        model = ts.load_model("zoo://tiny")
        assert isinstance(model, ts.UNet) and model.config["in_channels"] == 1
        assert ts.segment(np.zeros((20, 20)), "zoo://tiny", tile_size=4, device="cpu", progress=False).shape == (20, 20)
    finally:
        model_loaders.unregister("zoo")
    with pytest.raises(ts.ModelError, match="not found"):
        ts.load_model("zoo://tiny")


def test_a_loader_from_an_entry_point_is_used(tmp_path, monkeypatch):
    from importlib.metadata import EntryPoint

    from tilesegment import registry

    (tmp_path / "zoo_plugin.py").write_text(
        "import tilesegment as ts\n\n"
        "class ZooLoader:\n"
        "    name, priority = 'zoo', 5\n"
        "    def can_load(self, spec):\n"
        "        return isinstance(spec, str) and spec.startswith('zoo://')\n"
        "    def load(self, spec):\n"
        "        return ts.UNet(1, 2, base_channels=2, depth=1).eval()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    point = EntryPoint(name="zoo", value="zoo_plugin:ZooLoader", group="tilesegment.models")
    monkeypatch.setattr(registry, "entry_points", lambda group: [point] if group == point.group else [])
    loaders = registry.model_loaders
    monkeypatch.setattr(loaders, "_entries", dict(loaders._entries))  # undone after the test
    monkeypatch.setattr(loaders, "_loaded", False)  # entry points are read again
    assert "zoo" in loaders.names()
    assert isinstance(ts.load_model("zoo://tiny"), ts.UNet)
    assert isinstance(ts.load_model("demo"), ts.UNet)  # ours are still there
