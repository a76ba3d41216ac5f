import threading
import time

import numpy as np
import pytest
import torch

import tilesegment as ts
from tilesegment.executor import Executor, auto_batch_size, estimate_bytes_per_tile, reduce_logits, resolve_devices
from tilesegment.pipeline import run_pipeline
from tilesegment.testing import assert_exact, whole_image_logits

from conftest import small_unet

@pytest.fixture(scope="module")
def net():
    return small_unet(3, 3, base=4, depth=2, seed=7)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(3).integers(0, 256, (97, 123, 3), dtype=np.uint8)


def _our_threads():
    return [t for t in threading.enumerate() if t.name.startswith("tilesegment-")]


class OOMAbove(torch.nn.Module):
    """Wraps a network and runs out of 'memory' for batches above `limit`."""

    def __init__(self, net, limit, error=lambda: torch.OutOfMemoryError("simulated")):
        super().__init__()
        self.net, self.limit, self.sizes, self.error = net, limit, [], error

    @property
    def geometry(self):
        return self.net.geometry

    def __deepcopy__(self, memo):  # the executor's copy must record into this instance
        return self

    def forward(self, x):
        if x.device.type == "meta":  # shape probes
            return self.net(x)
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise self.error()
        return self.net(x)


def test_out_of_memory_halves_the_batch_and_loses_no_tile(net, image):
    expected = whole_image_logits(image, net)
    model = OOMAbove(net, limit=2)
    out = ts.segment(image, model, tile_size=16, batch_size=7, mode="logits", device="cpu", progress=False)
    assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()
    assert model.sizes[0] == 7 and model.sizes[-1] <= 2


def test_a_single_tile_that_does_not_fit_is_a_clear_error(net):
    ex = Executor(OOMAbove(net, limit=0), "cpu")
    with pytest.raises(ts.TileSegmentError, match="does not fit in memory.*smaller tile_size"):
        ex(np.zeros((1, 3, 60, 60), np.float32))


def test_memory_budget_splits_batches_before_running_them(net):
    geom = net.geometry
    per_tile = estimate_bytes_per_tile(net, 3, geom.input_size(16))
    assert per_tile > 3 * 56 * 56 * 4  # at least the input's worth of activations
    model = OOMAbove(net, limit=100)
    ex = Executor(model, "cpu", mode="logits", geometry=geom, tile_size=(16, 16), memory_budget=int(2.5 * per_tile))
    out = ex(np.random.rand(5, 3, *geom.input_size(16)).astype(np.float32)).numpy()
    assert out.shape[0] == 5 and max(model.sizes) <= 2


def test_auto_batch_size_is_one_on_cpu(net):
    assert auto_batch_size(net, torch.device("cpu"), 3, (300, 300)) == 1


def test_device_reduction_matches_the_stitcher_kernels(net, image):
    """The GPU post-processing path (crop + reduce on device), exercised on the CPU."""
    for mode in ("labels", "probabilities", "logits"):
        tiler = ts.Tiler(image, net.geometry, tile_size=32)
        ex = Executor(net, "cpu", mode=mode, geometry=net.geometry, tile_size=(32, 32), reduce_on_device=True)
        with ts.Stitcher(tiler.plan, mode=mode) as on_device:
            run_pipeline(tiler.batches(3), [ex], on_device)
        host = ts.segment(image, net, tile_size=32, mode=mode, progress=False)
        if mode == "logits":  # batch 3 vs 1: same numbers up to float rounding
            assert np.abs(on_device.result - host).max() <= 1e-5 * np.abs(host).max()
        else:
            assert np.abs(on_device.result.astype(int) - host).max() <= (0 if mode == "labels" else 1)


def test_reduce_logits_single_class_thresholds_and_sigmoids():
    y = torch.tensor([[[[-1.0, 0.5]]]])
    assert reduce_logits(y, "labels").tolist() == [[[[0, 1]]]]
    assert reduce_logits(y, "probabilities").tolist() == [[[[round(255 / (1 + np.e)), round(255 / (1 + np.exp(-0.5)))]]]]


class Jittery(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.rng = np.random.default_rng(0)

    @property
    def geometry(self):
        return self.net.geometry

    def forward(self, x):
        time.sleep(float(self.rng.uniform(0, 0.01)))
        return self.net(x)


def test_tiles_land_in_place_whatever_order_executors_finish(net, image):
    expected = ts.segment(image, net, tile_size=16, batch_size=2, mode="logits", progress=False)
    out = ts.segment(image, Jittery(net), tile_size=16, batch_size=2, mode="logits",
                     device=["cpu", "cpu", "cpu"], progress=False)
    assert_exact(out, expected)


class Boom(Exception):
    pass


class FailingModel(torch.nn.Module):
    def __init__(self, net, after):
        super().__init__()
        self.net, self.after, self.calls = net, after, 0

    @property
    def geometry(self):
        return self.net.geometry

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise Boom("model")
        return self.net(x)


class FailingArray:
    """An array whose reads fail after a few calls (a corrupt region of a slide)."""

    def __init__(self, data, after):
        self.data, self.after, self.calls = data, after, 0
        self.shape, self.dtype = data.shape, data.dtype

    def __getitem__(self, index):
        self.calls += 1
        if self.calls > self.after:
            raise Boom("reader")
        return self.data[index]


class FailingStore(__import__("zarr").storage.MemoryStore):
    async def set(self, key, value):
        if "/c/" in key and key.endswith("/1"):
            raise Boom("writer")
        await super().set(key, value)


@pytest.mark.parametrize("stage", ["reader", "model", "writer", "stitcher"])
def test_an_error_in_any_stage_stops_everything_without_hang_or_orphan_threads(net, image, stage):
    model, source, output = net, image, None
    if stage == "reader":
        source = FailingArray(image, after=5)
    elif stage == "model":
        model = FailingModel(net, after=3)
    elif stage == "writer":
        output = FailingStore()
    errors = []

    def run():
        try:
            if stage == "stitcher":  # the consumer itself fails mid-run
                tiler = ts.Tiler(image, net.geometry, tile_size=16)
                stitcher = ts.Stitcher(tiler.plan, mode="labels")
                real_add = stitcher.add
                calls = []

                def add(*args, **kwargs):
                    calls.append(1)
                    if len(calls) > 4:
                        raise Boom("stitcher")
                    real_add(*args, **kwargs)

                stitcher.add = add
                run_pipeline(tiler.batches(2), [Executor(net, "cpu")] * 2, stitcher)
            else:
                ts.segment(source, model, output, tile_size=16, chunk_size=16, batch_size=2,
                           device=["cpu", "cpu"], progress=False)
        except ts.TileReadError as exc:  # reader errors carry the tile position
            errors.append(exc.__cause__)
        except Boom as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "pipeline hung"
    assert [str(e) for e in errors] == [stage]
    time.sleep(0.05)
    assert _our_threads() == []


def test_resolve_devices_lists_and_rejects():
    assert resolve_devices(["cpu", "cpu"]) == [torch.device("cpu")] * 2
    with pytest.raises(ts.UsageError, match="empty"):
        resolve_devices([])
    if not torch.cuda.is_available():
        with pytest.raises(ts.UsageError, match="CUDA is not available"):
            resolve_devices("cuda")


_TF32_FLAGS = ["fp32_precision", "cudnn.fp32_precision", "cudnn.conv.fp32_precision", "cuda.matmul.fp32_precision"]


def _flag(path: str):
    *parents, name = path.split(".")
    owner = torch.backends
    for p in parents:
        owner = getattr(owner, p)
    return owner, name


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch < 2.9: legacy TF32 flags only")
@pytest.mark.parametrize("flag", _TF32_FLAGS)
def test_exact_fp32_turns_tf32_off_whichever_new_flag_set_it_and_restores_it(flag):
    import threading

    from tilesegment.process import exact_fp32, tf32_enabled

    before = {f: getattr(*_flag(f)) for f in _TF32_FLAGS}
    try:
        for f in _TF32_FLAGS:
            setattr(*_flag(f), "none")
        setattr(*_flag(flag), "tf32")  # the caller's choice, through torch >= 2.9's API
        assert tf32_enabled()
        inside, release = threading.Event(), threading.Event()

        def other_executor():
            with exact_fp32():
                inside.set()
                release.wait(5)

        thread = threading.Thread(target=other_executor)
        thread.start()
        inside.wait(5)
        with exact_fp32():  # no "mix of the legacy and new APIs" error
            assert not tf32_enabled()
        assert not tf32_enabled()  # the other thread is still in its block
        release.set()
        thread.join()
        assert tf32_enabled() and getattr(*_flag(flag)) == "tf32"  # the caller's setting is back
    finally:
        for f, value in before.items():
            setattr(*_flag(f), value)


def test_default_budget_ratios_per_purpose(monkeypatch):
    import os

    from tilesegment.executor import default_budget

    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cpu = torch.device("cpu")
    assert default_budget(cpu, "plan") == min(8 << 30, ram // 4)
    assert default_budget(cpu, "limit") == int(ram * 0.8)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000, 20_000))
    cuda = torch.device("cuda", 0)
    assert (default_budget(cuda, "plan"), default_budget(cuda, "limit")) == (7000, 9000)
    with pytest.raises(ValueError, match="purpose"):
        default_budget(cpu, "other")


def test_an_executor_runs_its_own_copy_and_leaves_the_callers_module_as_it_was(net):
    before = {k: (v.data_ptr(), v.stride()) for k, v in net.state_dict().items()}
    net.train()
    first, second = Executor(net, "cpu"), Executor(net, "cpu", channels_last=False)
    assert first.model is not net and second.model is not net and first.model is not second.model
    assert net.training and not first.model.training
    assert {k: (v.data_ptr(), v.stride()) for k, v in net.state_dict().items()} == before
    net.eval()


def test_auto_precision_follows_the_gpus_capability_not_emulated_bf16(monkeypatch):
    from tilesegment.executor import default_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    asked = []
    for capability, expected in [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None, c=capability: asked.append(device) or c)
        assert default_precision(torch.device("cuda", 1)) == expected
    assert asked == [torch.device("cuda", 1)] * 4  # the executor's GPU, not the current one
    assert default_precision(torch.device("cpu")) == "fp32"


def test_the_model_runs_with_the_executors_device_current_in_its_thread(net, monkeypatch):
    import contextlib

    import tilesegment.executor as executor_module
    from tilesegment.executor import device_scope

    scope = device_scope(torch.device("cuda", 1))  # made, not entered: no CUDA needed
    assert isinstance(scope, torch.cuda.device) and scope.idx == 1
    assert isinstance(device_scope(torch.device("cpu")), contextlib.nullcontext)
    entered = []

    @contextlib.contextmanager
    def recording(device):
        entered.append((device, threading.current_thread().name))
        yield

    monkeypatch.setattr(executor_module, "device_scope", recording)
    tiler = ts.Tiler(np.zeros((40, 40, 3), np.uint8), net.geometry, tile_size=16)
    with ts.Stitcher(tiler.plan, mode="labels") as stitcher:
        run_pipeline(tiler.batches(2), [Executor(net, "cpu")], stitcher)
    assert entered and all(d == torch.device("cpu") and t.startswith("tilesegment-exec") for d, t in entered)


class DictOutput(torch.nn.Module):
    """torchvision's segmentation models return ``{"out": logits, "aux": ...}``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        y = self.net(x)
        return {"out": y, "aux": -y}


def test_dict_outputs_are_unwrapped_as_the_probe_does(net, image):
    expected = ts.segment(image, net, tile_size=16, mode="logits", progress=False)
    assert_exact(ts.segment(image, DictOutput(net), tile_size=16, mode="logits", progress=False), expected)


def test_cudnn_and_cublas_allocation_failures_count_as_out_of_memory():
    from tilesegment.executor import _is_out_of_memory

    out_of_memory = [
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    ]
    other = [
        "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
        "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k)`",
        "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cuda:1!",
    ]
    assert [_is_out_of_memory(RuntimeError(m)) for m in out_of_memory] == [True] * 3
    assert [_is_out_of_memory(RuntimeError(m)) for m in other] == [False] * 3


@pytest.mark.parametrize("message", ["cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
                                     "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"])
def test_an_allocation_failure_halves_the_batch_and_finishes(net, message):
    model = OOMAbove(net, limit=2, error=lambda: RuntimeError(message))
    ex = Executor(model, "cpu")
    data = np.random.default_rng(0).random((5, 3, *net.geometry.input_size(16))).astype(np.float32)
    out = ex(data).numpy()
    assert out.shape[0] == 5 and model.sizes[0] == 5 and max(model.sizes[1:]) <= 2
    with torch.inference_mode():
        assert_exact(out, net(torch.from_numpy(data)).numpy())


class Identity(torch.nn.Module):
    geometry = ts.Geometry(halo=0, step=1)

    def forward(self, x):
        return x


@pytest.mark.parametrize("channels_last", [False, True])
def test_host_and_device_normalization_agree_bit_for_bit(channels_last):
    """Every uint8 value in every channel with ImageNet's mean and std: the host's gather
    (float inputs) and the executor's ``input_affine`` (raw uint8 inputs) give the same bits."""
    from tilesegment.io.mirror import gather, normalization_affine

    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    scale, offset = normalization_affine(np.uint8, 3, imagenet)
    pixels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # (1, 256, 3)
    host = np.empty((1, 256, 3), np.float32).transpose(2, 0, 1) if channels_last else np.empty((3, 1, 256), np.float32)
    gather(pixels, np.arange(1), np.arange(256), scale, offset, host)
    ex = Executor(Identity(), "cpu", input_affine=(scale, offset), channels_last=channels_last)
    device = ex(np.ascontiguousarray(pixels.transpose(2, 0, 1))[None]).numpy()[0]
    assert device.dtype == host.dtype == np.float32
    assert np.array_equal(device.view(np.uint32), host.view(np.uint32))


def test_a_split_batch_returns_while_its_parts_are_in_flight(net, monkeypatch):
    from tilesegment.executor import InFlight

    waits = []
    real = InFlight.numpy
    monkeypatch.setattr(InFlight, "numpy", lambda self: waits.append(1) or real(self))
    ex = Executor(net, "cpu", max_batch=2)
    data = np.random.default_rng(0).random((5, 3, *net.geometry.input_size(16))).astype(np.float32)
    result = ex(data)
    assert waits == []  # nothing waited on: the next batch can start at once
    out = result.numpy()
    assert len(waits) == 3 and out.shape[0] == 5
    with torch.inference_mode():
        assert_exact(out, net(torch.from_numpy(data)).numpy())


def test_a_compiled_model_sees_one_batch_size_and_the_padding_is_dropped(net, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # the batch sizes are the point
    model = OOMAbove(net, limit=4)
    ex = Executor(model, "cpu", compile=True)
    data = np.random.default_rng(0).random((9, 3, *net.geometry.input_size(16))).astype(np.float32)
    outputs = [ex(data[:7]).numpy(), ex(data[7:]).numpy()]  # 7: out of memory, then 3 + 3 + 1; then 2
    assert model.sizes == [7, 3, 3, 3, 3]
    assert [len(o) for o in outputs] == [7, 2]
    with torch.inference_mode():
        assert_exact(np.concatenate(outputs), net(torch.from_numpy(data)).numpy())


def test_compile_takes_torch_compiles_modes_and_cuda_graphs_come_from_reduce_overhead(net, monkeypatch):
    from tilesegment.cli import _parser

    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    Executor(net, "cpu", compile=True)
    Executor(net, "cpu", compile="reduce-overhead")
    assert modes == [None, "reduce-overhead"]
    with pytest.raises(ts.UsageError, match="compile 'fast' is unknown"):
        Executor(net, "cpu", compile="fast")
    parse = _parser().parse_args
    assert parse(["segment", "a.tif", "o.zarr", "--compile"]).compile is True
    assert parse(["segment", "a.tif", "o.zarr", "--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert parse(["segment", "a.tif", "o.zarr"]).compile is False


def test_cudnn_autotune_is_on_inside_and_restored_after():
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with ts.cudnn_autotune():
            with ts.cudnn_autotune():  # nested: the outer block still holds it
                assert torch.backends.cudnn.benchmark
            assert torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before
