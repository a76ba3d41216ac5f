"""bioimage.io model packages: geometry from the description, per-tile processing, test tensors."""

import zipfile

import numpy as np
import pytest
import torch

import tilesegment as ts
from tilesegment.cli import main
from tilesegment.testing import assert_exact

pytest.importorskip("bioimageio.spec")
pytest.importorskip("bioimageio.core")

from tilesegment.models.bioimageio import BioimageioModel, check_test_tensors  # noqa: E402

CONFIG = dict(in_channels=2, num_classes=3, base_channels=4, depth=2)
MEAN, STD = [0.4, 0.6], [0.2, 0.3]


def _network():
    torch.manual_seed(0)
    net = ts.UNet(**CONFIG).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.25)  # moderate logits: the sigmoid stays informative
    return net


def build_package(folder, *, out_halo=0, pre="fixed", post="sigmoid", fixed_size=False, onnx_external=False):
    """A small valid bioimage.io package (spec 0.5), written with bioimageio.spec, no network.

    The architecture is a Python file that builds a tilesegment U-Net; the
    test output is computed here with plain torch, independently of the loader.
    """
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as spec

    folder.mkdir(parents=True, exist_ok=True)
    net = _network()
    (folder / "arch.py").write_text("import tilesegment as ts\n\n\ndef build(**kwargs):\n    return ts.UNet(**kwargs)\n")
    torch.save(net.state_dict(), folder / "weights.pt")
    (folder / "README.md").write_text("# tiny valid U-Net\n")
    g = net.geometry
    x = np.random.default_rng(0).random((1, 2, g.min_input[0] + 3 * g.step[0], g.min_input[1] + 4 * g.step[1]))
    x = x.astype(np.float32)
    np.save(folder / "test_input.npy", x)
    mean, std = np.array(MEAN, np.float32)[:, None, None], np.array(STD, np.float32)[:, None, None]
    with torch.no_grad():
        y = net(torch.from_numpy((x - mean) / std if pre == "fixed" else x))
    y = torch.sigmoid(y) if post == "sigmoid" else y
    np.save(folder / "test_output.npy", y.numpy())

    preprocessing = []
    if pre == "fixed":
        preprocessing = [spec.FixedZeroMeanUnitVarianceDescr(kwargs=spec.FixedZeroMeanUnitVarianceAlongAxisKwargs(
            mean=MEAN, std=STD, axis=spec.AxisId("channel")))]
    elif pre == "per_sample":
        preprocessing = [spec.ZeroMeanUnitVarianceDescr()]
    elif pre == "scale_range":
        preprocessing = [spec.ScaleRangeDescr(kwargs=spec.ScaleRangeKwargs(min_percentile=1, max_percentile=99))]
    postprocessing = [spec.SigmoidDescr()] if post == "sigmoid" else []

    # The spec wants outputs larger than twice their halo: start the valid sizes higher then.
    smallest = g.min_input[0] + (g.step[0] * -(-2 * out_halo // g.step[0]) if out_halo else 0)

    def space_in(axis):
        size = x.shape[2 + "yx".index(axis)] if fixed_size else spec.ParameterizedSize(min=smallest, step=g.step[0])
        return spec.SpaceInputAxis(id=spec.AxisId(axis), size=size)

    def space_out(axis):
        ref = spec.SizeReference(tensor_id=spec.TensorId("raw"), axis_id=spec.AxisId(axis), offset=-g.shrink[0])
        if out_halo:
            return spec.SpaceOutputAxisWithHalo(id=spec.AxisId(axis), size=ref, halo=out_halo)
        return spec.SpaceOutputAxis(id=spec.AxisId(axis), size=ref)

    channels = [spec.Identifier(n) for n in ("dapi", "membrane")]
    inputs = [spec.InputTensorDescr(
        id=spec.TensorId("raw"), axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=channels), space_in("y"), space_in("x")],
        test_tensor=spec.FileDescr(source=folder / "test_input.npy"), preprocessing=preprocessing)]
    outputs = [spec.OutputTensorDescr(
        id=spec.TensorId("probabilities"),
        axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(f"class{k}") for k in range(3)]),
              space_out("y"), space_out("x")],
        test_tensor=spec.FileDescr(source=folder / "test_output.npy"), postprocessing=postprocessing)]
    weights = spec.WeightsDescr(pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
        source=folder / "weights.pt", pytorch_version="2.13",
        architecture=spec.ArchitectureFromFileDescr(source=folder / "arch.py", callable=spec.Identifier("build"),
                                                    kwargs=CONFIG)))
    if onnx_external:  # ONNX weights in an external data file, as torch >= 2.9 exports them
        import onnx

        exported = ts.save_model(net, folder / "weights.onnx", format="onnx")
        onnx.save(onnx.load(str(exported)), str(exported), save_as_external_data=True,
                  location="weights.onnx.data", size_threshold=0)
        weights = spec.WeightsDescr(onnx=spec.OnnxWeightsDescr(
            source=folder / "weights.onnx", opset_version=17,
            external_data=spec.FileDescr(source=folder / "weights.onnx.data")))
    descr = spec.ModelDescr(
        name="tiny valid unet", description="A tiny valid-convolution U-Net for tests.",
        authors=[spec.Author(name="tilesegment tests")], license=spec.LicenseId("MIT"),
        cite=[spec.CiteEntry(text="Ronneberger et al. 2015", doi=spec.Doi("10.1007/978-3-319-24574-4_28"))],
        documentation=spec.FileDescr(source=folder / "README.md"), inputs=inputs, outputs=outputs, weights=weights)
    return save_bioimageio_package(descr, output_path=folder / "package.zip"), net


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return build_package(tmp_path_factory.mktemp("bioimageio"))[0]


def test_package_reproduces_its_own_test_tensors(package):
    model = ts.load_model(package)
    assert isinstance(model, BioimageioModel) and model.weights_format == "pytorch_state_dict"
    assert check_test_tensors(model) < 1e-5


def test_geometry_comes_from_the_description(package, tmp_path):
    net = _network()
    assert ts.Geometry.of(ts.load_model(package)) == net.geometry  # ParameterizedSize + offset
    haloed, _ = build_package(tmp_path / "halo", out_halo=2)
    geometry = ts.load_model(haloed).geometry
    assert geometry.halo == (net.geometry.halo[0] + 2,) * 2 and geometry.shrink == net.geometry.shrink
    assert geometry.crop == (2, 2) and geometry.step == net.geometry.step
    assert geometry.min_input == (net.geometry.min_input[0] + 4,) * 2


@pytest.mark.parametrize("halo", [0, 2])
def test_tiled_equals_whole_image_under_the_package_geometry(package, tmp_path, halo):
    model = ts.load_model(package if halo == 0 else build_package(tmp_path / "h", out_halo=halo)[0])
    image = np.random.default_rng(1).random((2, 93, 71)).astype(np.float32)  # (C, Y, X) floats pass as they are
    whole = ts.segment(image, model, tile_size=96, mode="logits", progress=False)  # one tile
    assert whole.shape == (3, 93, 71) and 0 <= whole.min() and whole.max() <= 1  # sigmoid ran
    assert 0.05 < np.mean((whole > 0.01) & (whole < 0.99))  # and is not saturated
    for tile in (16, 36, 52):
        tiled = ts.segment(image, model, tile_size=tile, batch_size=2, mode="logits", progress=False)
        assert_exact(tiled, whole, what=f"tile {tile}")


def test_preprocessing_runs_per_tile_as_the_spec_defines(package):
    model = ts.load_model(package)
    image = np.random.default_rng(2).random((2, 60, 60)).astype(np.float32)
    got = ts.segment(image, model, tile_size=32, mode="logits", progress=False)
    g = model.geometry
    mean, std = np.array(MEAN, np.float32)[:, None, None], np.array(STD, np.float32)[:, None, None]
    padded = np.pad(image, [(0, 0), (g.halo[0], 100), (g.halo[1], 100)], mode="reflect")
    n = g.input_size(64)  # whole-image inference of the reflect-padded image, by hand
    with torch.no_grad():
        ref = torch.sigmoid(_network()(torch.from_numpy((padded[:, : n[0], : n[1]] - mean) / std)[None]))[0]
    assert_exact(got, ref[:, :60, :60].numpy())


def test_onnx_weights_count_in_the_memory_estimate(tmp_path):
    """onnxruntime's layers are invisible to the meta-device trace; the ONNX graph counts them."""
    pytest.importorskip("onnx")
    from tilesegment.executor import estimate_bytes_per_tile

    path, net = build_package(tmp_path, onnx_external=True)
    model = ts.load_model(path)
    size = model.geometry.input_size(256)
    want = estimate_bytes_per_tile(net, model.in_channels, size)
    assert want / 4 <= estimate_bytes_per_tile(model, model.in_channels, size) <= 4 * want


def test_onnx_weights_with_external_data_load_from_the_package(tmp_path):
    pytest.importorskip("onnx")
    path, net = build_package(tmp_path, onnx_external=True)
    model = ts.load_model(path)
    assert model.weights_format == "onnx" and check_test_tensors(model) < 1e-4
    image = np.random.default_rng(4).random((2, 70, 50)).astype(np.float32)
    whole = ts.segment(image, model, tile_size=80, mode="logits", progress=False)  # one tile
    assert_exact(ts.segment(image, model, tile_size=16, mode="logits", progress=False), whole)


@pytest.mark.parametrize("pre, words", [("per_sample", "zero_mean_unit_variance' needs the mean and std of the whole image"),
                                        ("scale_range", "scale_range' needs percentiles of the whole image")])
def test_whole_image_statistics_preprocessing_is_refused_with_the_reason(tmp_path, pre, words):
    path, _ = build_package(tmp_path / pre, pre=pre)
    with pytest.raises(ts.ModelError, match=words):
        ts.load_model(path)


def test_fixed_spatial_size_is_refused(tmp_path):
    path, _ = build_package(tmp_path / "fixed", fixed_size=True)
    with pytest.raises(ts.ModelError, match="fixed size .*ParameterizedSize"):
        ts.load_model(path)


def test_a_file_that_does_not_match_its_sha256_is_refused(package, tmp_path):
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(package) as archive:
        archive.extractall(folder)
    assert ts.load_model(folder / "rdf.yaml").weights_format == "pytorch_state_dict"
    weights = next(folder.glob("*.pt"))
    torch.save({k: v + 1 for k, v in torch.load(weights).items()}, weights)  # tampered weights
    with pytest.raises(ts.ModelError, match="not a valid bioimage.io model.*SHA256 mismatch for .*weights.pt"):
        ts.load_model(folder / "rdf.yaml")


def test_cli_segments_with_a_package_and_info_runs_its_test_tensors(package, tmp_path, capsys):
    import tifffile
    import zarr

    image = np.random.default_rng(3).random((2, 80, 70)).astype(np.float32)
    tifffile.imwrite(tmp_path / "two.tif", image, metadata={"axes": "CYX"})
    out = tmp_path / "out.zarr"
    assert main(["segment", str(tmp_path / "two.tif"), str(out), "--model", str(package), "--tile-size", "32",
                 "--quiet"]) == 0
    expected = ts.segment(image, ts.load_model(package), tile_size=32, progress=False)  # the CLI's plan
    np.testing.assert_array_equal(zarr.open_array(out / "0")[:], expected)
    assert main(["info", str(tmp_path / "two.tif"), "--model", str(package)]) == 0
    said = capsys.readouterr().out
    assert "loading a package runs its code" in said and "test input reproduces its test output" in said
    assert "halo 20, step 4" in said
