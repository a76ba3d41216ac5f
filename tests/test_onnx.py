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


# -- GPU providers, checked without a GPU: the options built, the providers loaded, the errors told ---

def test_fp32_on_cuda_turns_tf32_off_and_bounds_the_arena():
    from tilesegment.models.onnx import _provider_options

    fp32 = _provider_options("CUDAExecutionProvider", "fp32", 3 << 30)
    assert fp32 == {"use_tf32": "0", "gpu_mem_limit": str(3 << 30), "arena_extend_strategy": "kSameAsRequested"}
    assert _provider_options("CUDAExecutionProvider", "bf16", None) == {"use_tf32": "1"}
    assert _provider_options("TensorrtExecutionProvider", "fp32", 1 << 30) == {"trt_fp16_enable": "0"}
    assert _provider_options("TensorrtExecutionProvider", "fp16", 1 << 30) == {"trt_fp16_enable": "1"}


def test_the_executors_precision_reaches_the_onnx_session(tmp_path):
    from tilesegment.executor import Executor
    from tilesegment.models.onnx import _autocast_precision

    model = ts.load_model(ts.save_model(small_unet(), tmp_path / "n.onnx", format="onnx"))
    for precision in ("fp32", "bf16"):
        with Executor(model, "cpu", precision=precision).precision_context():
            assert _autocast_precision("cpu") == precision


class _FakeOrt:
    """onnxruntime as onnxruntime-gpu's build reports itself, for the provider list built."""

    __version__ = "1.20.1"

    @staticmethod
    def get_available_providers():
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_gpu_providers_carry_the_device_the_precision_and_the_callers_options(tmp_path, monkeypatch):
    import tilesegment.executor

    monkeypatch.setattr(tilesegment.executor, "default_budget", lambda device, purpose: 5 << 30)
    path = ts.save_model(small_unet(), tmp_path / "n.onnx", format="onnx")
    mine = ("CUDAExecutionProvider", {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC", "gpu_mem_limit": 7})
    model = OnnxModel(path, providers=["TensorrtExecutionProvider", mine])
    with pytest.warns(RuntimeWarning, match="TensorRT runs fp32 layers in TF32.*NVIDIA_TF32_OVERRIDE=0"):
        providers = model._gpu_providers(_FakeOrt, "cuda:1", "fp32")
    assert providers == [
        ("TensorrtExecutionProvider", {"trt_fp16_enable": "0", "device_id": "1"}),
        ("CUDAExecutionProvider", {"use_tf32": "0", "gpu_mem_limit": 7, "arena_extend_strategy": "kSameAsRequested",
                                   "cudnn_conv_algo_search": "HEURISTIC", "device_id": "1"}),
        "CPUExecutionProvider",
    ]
    old = type("Ort", (_FakeOrt,), {"__version__": "1.17.3"})
    with pytest.raises(ts.ModelError, match=r"onnxruntime 1.17.3 cannot run CUDA convolutions in true fp32"):
        OnnxModel(path)._gpu_providers(old, "cuda:0", "fp32")
    assert OnnxModel(path)._gpu_providers(old, "cuda:0", "bf16")[0][1]["use_tf32"] == "1"


def test_a_cpu_build_of_onnxruntime_is_refused_for_cuda(tmp_path):
    model = ts.load_model(ts.save_model(small_unet(), tmp_path / "n.onnx", format="onnx"))
    with pytest.raises(ts.ModelError, match=r"n.onnx: this onnxruntime has no CUDA provider .*onnxruntime-gpu"):
        model._session("cuda:0")


@pytest.mark.filterwarnings("ignore:Specified provider")  # onnxruntime's own notice
def test_a_gpu_provider_that_does_not_load_is_an_error_not_a_silent_cpu_run(tmp_path, monkeypatch):
    import onnxruntime

    import tilesegment.executor
    from tilesegment.models.onnx import _check_loaded

    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ts.ModelError, match=r"m.onnx: onnxruntime could not load CUDAExecutionProvider on "
                                            r"cuda:0 .*onnxruntime-gpu\[cuda,cudnn\].* would run on the CPU"):
        _check_loaded("m.onnx", "cuda:0", gpu[1:], ["CPUExecutionProvider"], gpu)
    with pytest.warns(RuntimeWarning, match="could not load TensorrtExecutionProvider on cuda:1; running with "
                                            "CUDAExecutionProvider"):
        _check_loaded("m.onnx", "cuda:1", gpu, gpu[1:], gpu)
    _check_loaded("m.onnx", "cuda:0", gpu[1:], gpu[1:], gpu)  # all there: silent
    # onnxruntime itself: a build that says it has CUDA, and whose CUDA provider does not load
    # (this CPU build's), falls back to the CPU; the session made is refused.
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: gpu[1:])
    monkeypatch.setattr(tilesegment.executor, "default_budget", lambda device, purpose: 1 << 30)
    model = ts.load_model(ts.save_model(small_unet(), tmp_path / "n.onnx", format="onnx"))
    with pytest.raises(ts.ModelError, match="could not load CUDAExecutionProvider on cuda:0"):
        model._session("cuda:0")
    assert list(model.execution_providers) == ["cpu"]  # what ran: the CPU session of the probe only
    assert list(model.execution_providers["cpu"]) == ["CPUExecutionProvider"]


#: onnxruntime's errors as its users reported them (microsoft/onnxruntime#22702, #16307, #10770;
#: hacksider/Deep-Live-Cam#584, #645), paths shortened.
ORT_OUT_OF_MEMORY = [
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. "
    "Name:'Conv_111' Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:376 void* "
    "onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*, bool, "
    "onnxruntime::WaitNotificationFn) Failed to allocate memory for requested buffer of size 13111296",
    "[ONNXRuntimeError] : 1 : FAIL : cuda_call.cc:114 onnxruntime::CudaCall CUDA failure 2: out of memory ; "
    "GPU=0 ; hostname=h ; file=cuda_stream_handle.cc ; line=175 ; expr=cudaStreamCreateWithFlags(&stream, "
    "cudaStreamNonBlocking);",
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Gemm node. "
    "Name:'fc1' Status Message: cuda_call.cc:114 onnxruntime::CudaCall CUBLAS failure 3: "
    "CUBLAS_STATUS_ALLOC_FAILED ; GPU=0 ; expr=cublasCreate(&cublas_handle_);",
    "cuda_call.cc:114 onnxruntime::CudaCall CUDNN failure 2: CUDNN_STATUS_ALLOC_FAILED ; GPU=0 ; "
    "expr=cudnnCreate(&cudnn_handle_);",
    "[E:onnxruntime:Default, tensorrt_execution_provider.h:50 log] ../rtSafe/safeRuntime.cpp (25) - "
    "Cuda Error in allocate: 2 (out of memory)",
]
ORT_OTHER = [
    "[ONNXRuntimeError] : 1 : FAIL : Failed to create CUDAExecutionProvider",
    "cuda_call.cc:114 onnxruntime::CudaCall CUDA failure 100: no CUDA-capable device is detected ; GPU=0",
    "onnx runtime error 2: not enough space: expected 318080, got 314240",
]


@pytest.mark.parametrize("message", ORT_OUT_OF_MEMORY)
def test_onnxruntime_out_of_memory_errors_are_recognised(message):
    from tilesegment.models.onnx import _is_out_of_memory

    assert _is_out_of_memory(message)


@pytest.mark.parametrize("message", ORT_OTHER)
def test_other_onnxruntime_errors_are_not_out_of_memory(message):
    from tilesegment.models.onnx import _is_out_of_memory

    assert not _is_out_of_memory(message)


def test_a_device_binding_error_that_names_memory_types_is_not_out_of_memory(tmp_path):
    """This onnxruntime's own error for CUDA memory bound to a CPU session: it names 'MemoryType'."""
    from tilesegment.models.onnx import _is_out_of_memory

    model = ts.load_model(ts.save_model(small_unet(), tmp_path / "n.onnx", format="onnx"))
    binding = model._session("cpu").io_binding()
    with pytest.raises(RuntimeError) as info:
        binding.bind_input("input", "cuda", 0, np.float32, (1, 3, 44, 44), 1 << 20)
    assert "MemoryType" in str(info.value) and not _is_out_of_memory(str(info.value))


# -- memory estimate ------------------------------------------------------------------------------

def test_onnx_memory_estimate_is_that_of_the_torch_network_and_so_is_the_automatic_batch(tmp_path):
    from tilesegment.executor import auto_batch_size, estimate_bytes_per_tile

    net = ts.UNet(3, 2, base_channels=16, depth=4).eval()
    model = ts.load_model(ts.save_model(net, tmp_path / "n.onnx", format="onnx"))
    output_only = 4 * 2 * 2048 * 2048  # what the meta-device trace saw of an ONNX model
    for tile in (256, 2048):
        size = net.geometry.input_size(tile)
        onnx_bytes, torch_bytes = (estimate_bytes_per_tile(m, 3, size) for m in (model, net))
        assert torch_bytes / 4 <= onnx_bytes <= 4 * torch_bytes
    assert onnx_bytes > 100 * output_only
    cuda = torch.device("cuda")  # only its type is read, with the budget given
    batches = [auto_batch_size(m, cuda, 3, size, budget=40 << 30) for m in (model, net)]
    assert batches[0] == batches[1] < 64


def test_memory_estimate_of_a_dynamo_export_and_of_a_fixed_batch(dynamo_export, tmp_path):
    from tilesegment.executor import estimate_bytes_per_tile

    path, net = dynamo_export
    size = net.geometry.input_size(512)
    want = estimate_bytes_per_tile(net, 3, size)
    assert want / 4 <= ts.load_model(str(path)).activation_bytes(size) <= 4 * want
    fixed = ts.load_model(_raw_export(net, tmp_path / "fixed.onnx", batch_dynamic=False, batch=3,
                                      size=net.geometry.min_input[0]))
    assert want / 4 <= fixed.activation_bytes(size) <= 4 * want  # per tile, not per group of 3


def test_memory_estimate_without_the_onnx_package_is_a_stated_bound(tmp_path, monkeypatch):
    model = ts.load_model(ts.save_model(small_unet(), tmp_path / "n.onnx", format="onnx"))
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.warns(RuntimeWarning, match="pip install onnx"):
        assert model.activation_bytes((60, 60)) == 64 * 4 * 3 * 60 * 60
