"""ONNX models through onnxruntime: exact like the torch model, geometry from the file or a probe."""

import copy
import pickle
import sys

import numpy as np
import pytest
import torch
import zarr

import tilesegment as ts
from tilesegment.cli import main
from tilesegment.io.manifest import model_hash
from tilesegment.testing import assert_exact, assert_labels_match, whole_image_logits

from conftest import small_unet

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from tilesegment.models.onnx import GEOMETRY_KEY, OnnxModel  # noqa: E402

#: ONNX Runtime against torch: two runtimes with their own kernels, fusions and summation
#: orders, so the bound is 1e-4 of the largest logit rather than one runtime's 1e-5.
ONNX_RTOL = 1e-4


def _raw_export(net, path, in_channels=3, size=44, dynamic=True, batch_dynamic=True, batch=1):
    """torch.onnx.export without tilesegment's metadata (as a user's own export would be)."""
    import warnings

    axes = {}
    if dynamic:
        axes = {"input": {2: "h", 3: "w"}}
        if batch_dynamic:
            axes["input"][0] = "n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (torch.zeros(batch, in_channels, size, size),), str(path), dynamo=False,
                          input_names=["input"], output_names=["output"], dynamic_axes=axes or None)
    return path


def test_onnx_export_run_as_cli_model_equals_the_torch_run(tmp_path, rgb_tiff):
    net = small_unet(3, 3, base=8, depth=2, seed=3)
    torch_file = ts.save_model(net, tmp_path / "net.pt")
    onnx_file = ts.save_model(net, tmp_path / "net.onnx", format="onnx")
    outs = {}
    for name, model in (("torch", torch_file), ("onnx", onnx_file)):
        out = tmp_path / f"{name}.zarr"
        assert main(["segment", str(rgb_tiff), str(out), "--model", str(model), "--tile-size", "64",
                     "--mode", "logits", "--quiet"]) == 0
        outs[name] = zarr.open_array(out / "0")[:]
    assert outs["onnx"].shape == outs["torch"].shape == (3, 150, 131)
    assert_exact(outs["onnx"], outs["torch"], rtol=ONNX_RTOL)
    # ... and so the label maps agree wherever the top two logits are not a near tie.
    labels = ts.segment(rgb_tiff, onnx_file, tile_size=32, progress=False)
    assert_labels_match(labels, outs["torch"], rtol=ONNX_RTOL)


@pytest.mark.parametrize("depth, base", [(1, 4), (2, 4), (3, 2)])
def test_probed_geometry_of_a_plain_export_equals_the_analytic_one(tmp_path, depth, base):
    net = small_unet(1, 2, base=base, depth=depth)
    path = _raw_export(net, tmp_path / "raw.onnx", in_channels=1, size=net.geometry.min_input[0])
    model = OnnxModel(path)
    assert GEOMETRY_KEY not in model.metadata  # really probed, not read
    assert model.geometry == net.geometry and model.num_classes == 2 and model.in_channels == 1


def test_tiled_onnx_equals_whole_image_torch_for_several_tile_sizes(tmp_path):
    net = small_unet(3, 2, base=4, depth=2, seed=5)
    model = ts.load_model(_raw_export(net, tmp_path / "raw.onnx"))
    image = np.random.default_rng(2).random((97, 83, 3)).astype(np.float32)
    whole = ts.segment(image, net, tile_size=112, mode="logits", progress=False)  # one tile
    for tile in (16, 36, 64):
        tiled = ts.segment(image, model, tile_size=tile, batch_size=3, mode="logits", progress=False)
        assert_exact(tiled, whole, rtol=ONNX_RTOL, what=f"tile {tile}")


def test_fixed_spatial_axes_are_refused_with_what_to_do(tmp_path, capsys, rgb_tiff):
    net = small_unet(3, 2)
    path = _raw_export(net, tmp_path / "fixed.onnx", dynamic=False)
    with pytest.raises(ts.ModelError, match=r"fixed spatial axes \(44, 44\).*dynamic"):
        ts.load_model(path)
    assert main(["segment", str(rgb_tiff), str(tmp_path / "o.zarr"), "--model", str(path)]) == 2
    assert "fixed spatial axes" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("batch", [1, 3])
def test_a_fixed_batch_size_runs_any_batch_in_groups_of_it(tmp_path, batch):
    net = small_unet(3, 2, base=4, depth=2, seed=6)
    model = ts.load_model(_raw_export(net, tmp_path / "fixed.onnx", batch_dynamic=False, batch=batch))
    image = np.random.default_rng(3).random((70, 90, 3)).astype(np.float32)
    ref = ts.segment(image, net, tile_size=32, mode="logits", progress=False)
    got = ts.segment(image, model, tile_size=32, batch_size=4, mode="logits", progress=False)
    assert_exact(got, ref, rtol=ONNX_RTOL)


def test_same_padded_network_needs_a_declared_geometry(tmp_path):
    torch.manual_seed(0)
    same = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 2, 3, padding=1)).eval()
    path = _raw_export(same, tmp_path / "same.onnx", in_channels=1, size=32)
    with pytest.raises(ts.ModelError, match="pads internally .*geometry=ts.Geometry"):
        OnnxModel(path)
    model = OnnxModel(path, geometry=ts.Geometry(halo=2, step=1))
    image = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    out = ts.segment(image, model, tile_size=16, mode="logits", progress=False)
    ref = same(torch.from_numpy(np.pad(image, 2, mode="reflect"))[None, None]).detach().numpy()[0]
    assert_exact(out, ref[:, 2:-2, 2:-2], rtol=ONNX_RTOL)


def test_normalization_and_metadata_travel_in_the_onnx_file(tmp_path):
    torch.manual_seed(1)
    net = ts.UNet(3, 2, base_channels=4, depth=1, normalization=([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])).eval()
    path = ts.save_model(net, tmp_path / "n.onnx", format="onnx", trained_on="nothing")
    model = ts.load_model(path)
    assert model.normalization == net.normalization
    assert model.metadata["tilesegment.trained_on"] == '"nothing"'
    image = np.random.default_rng(4).integers(0, 256, (60, 50, 3), dtype=np.uint8)
    ref = ts.segment(image, net, tile_size=24, mode="logits", progress=False)
    assert_exact(ts.segment(image, model, tile_size=24, mode="logits", progress=False), ref, rtol=ONNX_RTOL)


def test_model_hash_tells_onnx_files_apart_and_survives_copies(tmp_path):
    a = ts.load_model(ts.save_model(small_unet(seed=1), tmp_path / "a.onnx", format="onnx"))
    b = ts.load_model(ts.save_model(small_unet(seed=2), tmp_path / "b.onnx", format="onnx"))
    assert model_hash(a) != model_hash(b)
    for clone in (copy.deepcopy(a), pickle.loads(pickle.dumps(a)), ts.load_model(tmp_path / "a.onnx")):
        assert model_hash(clone) == model_hash(a)
        x = torch.rand(2, 3, 48, 52)
        torch.testing.assert_close(clone(x), a(x))


def test_resume_refuses_another_onnx_model(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    a = ts.save_model(small_unet(seed=1), tmp_path / "a.onnx", format="onnx")
    b = ts.save_model(small_unet(seed=2), tmp_path / "b.onnx", format="onnx")
    out = tmp_path / "o.zarr"
    job = ts.prepare(image, a, out, tile_size=32, chunk_size=32)
    stitcher = ts.Stitcher(job.plan, ts.Output(out, record=job.record), num_classes=3)
    stitcher.fill([0])
    stitcher.__exit__(KeyboardInterrupt, None, None)
    with pytest.raises(ts.UsageError, match="cannot resume .*model was"):
        ts.prepare(image, b, out, tile_size=32, chunk_size=32, resume=True)
    assert ts.prepare(image, a, out, tile_size=32, chunk_size=32, resume=True).resume


def test_info_shows_the_geometry_of_an_onnx_model(tmp_path, capsys, rgb_tiff):
    path = ts.save_model(small_unet(), tmp_path / "n.onnx", format="onnx")
    assert main(["info", str(rgb_tiff), "--model", str(path)]) == 0
    assert "halo 20, step 4, smallest input 44" in capsys.readouterr().out


def test_not_an_onnx_file_and_missing_onnxruntime_are_clear_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ts.ModelError, match="bad.onnx is not a readable ONNX model"):
        ts.load_model(bad)
    good = ts.save_model(small_unet(), tmp_path / "n.onnx", format="onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ts.ModelError, match=r"pip install onnxruntime onnx"):
        ts.load_model(good)


@pytest.fixture(scope="module")
def dynamo_export(tmp_path_factory):
    """``torch.onnx.export`` as torch >= 2.9 does it by default: the dynamo exporter, whose
    weights go to ``m.onnx.data`` beside ``m.onnx``."""
    pytest.importorskip("onnxscript")
    import warnings

    net = ts.UNet(3, 2, base_channels=4, depth=2).eval()
    folder = tmp_path_factory.mktemp("dynamo")
    example = torch.zeros(1, 3, *net.geometry.min_input)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), str(folder / "m.onnx"), dynamo=True, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}})
    assert (folder / "m.onnx.data").is_file()  # what this fixture is for
    return folder / "m.onnx", net


def _copy_model(path, folder, with_data=True):
    import shutil

    folder.mkdir()
    shutil.copy(path, folder)
    if with_data:
        shutil.copy(path.with_name(path.name + ".data"), folder)
    return folder / path.name


def test_dynamo_export_with_external_data_runs_from_any_working_folder(dynamo_export, tmp_path, monkeypatch):
    path, net = dynamo_export
    monkeypatch.chdir(tmp_path)  # not the model's folder: the weights are found beside the model
    image = np.random.default_rng(7).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    got = ts.segment(image, str(path), tile_size=32, mode="logits", progress=False)
    assert_exact(got, whole_image_logits(image, net), rtol=ONNX_RTOL)


def test_missing_external_data_file_is_named(dynamo_export, tmp_path, rgb_tiff, capsys):
    alone = _copy_model(dynamo_export[0], tmp_path / "alone", with_data=False)
    with pytest.raises(ts.ModelError, match=r"m.onnx keeps its weights in the external data file m.onnx.data, "
                                            r"which is missing"):
        ts.load_model(alone)
    assert main(["segment", str(rgb_tiff), str(tmp_path / "o.zarr"), "--model", str(alone)]) == 2
    err = capsys.readouterr().err
    assert "m.onnx.data" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_changed_external_data_is_another_model_for_resume(dynamo_export, tmp_path, rgb_tiff, capsys):
    model = _copy_model(dynamo_export[0], tmp_path / "model")
    out = tmp_path / "o.zarr"
    job = ts.prepare(rgb_tiff, model, out, tile_size=32, chunk_size=32)
    stitcher = ts.Stitcher(job.plan, ts.Output(out, record=job.record), num_classes=2)
    stitcher.fill([0])  # one block done, then stopped
    stitcher.__exit__(KeyboardInterrupt, None, None)
    assert ts.prepare(rgb_tiff, model, out, tile_size=32, chunk_size=32, resume=True).resume
    data = model.with_name("m.onnx.data")
    weights = np.frombuffer(data.read_bytes(), np.float32).copy()
    weights[:8] += 1.0  # the same file, the same size, other weights
    data.write_bytes(weights.tobytes())
    assert main(["segment", str(rgb_tiff), str(out), "--model", str(model), "--tile-size", "32",
                 "--chunk-size", "32", "--resume", "--quiet"]) == 2
    assert "cannot resume" in capsys.readouterr().err
