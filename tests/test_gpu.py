"""The GPU contract, on CUDA machines only: true fp32 is exact, reduced precision keeps the labels.

Every other test runs on the CPU in fp32 (see conftest.py); these are the ones
that mean "auto" as a user on a GPU machine gets it.
"""

import numpy as np
import pytest
import torch

import tilesegment as ts
from tilesegment.executor import default_precision, resolve_devices
from tilesegment.testing import assert_exact, assert_labels_match, whole_image_logits

pytestmark = pytest.mark.gpu

#: bf16 keeps 8 bits of mantissa (relative rounding 2**-8 per operation) through a depth-4
#: U-Net's ~20 layers; labels may differ only where the top two logits are that close.
REDUCED_PRECISION_RTOL = 0.05


@pytest.fixture(scope="module")
def big():
    torch.manual_seed(1)
    return ts.UNet(3, 3, base_channels=8, depth=4).eval()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (700, 600, 3), dtype=np.uint8)


def test_auto_means_every_gpu_and_bf16_where_supported():
    devices = resolve_devices("auto")
    assert devices == [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for device in devices:  # native bf16 only: emulated bf16 (T4, V100) runs fp16
        with torch.cuda.device(device):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        assert default_precision(device) == ("bf16" if native else "fp16")


def test_fp32_on_cuda_is_exact_inside_exact_fp32_and_refused_with_tf32_on(big, image):
    expected = whole_image_logits(image, big)
    cudnn, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (cudnn.fp32_precision, matmul.fp32_precision)
    cudnn.fp32_precision = matmul.fp32_precision = "tf32"  # PyTorch's default for convolutions on Ampere+
    try:
        with pytest.raises(ts.UsageError, match="exact_fp32"):
            ts.segment(image, big, tile_size=256, device="cuda", precision="fp32", progress=False)
        with ts.exact_fp32():
            fp32 = ts.segment(image, big, tile_size=256, mode="logits", device="cuda", precision="fp32",
                              progress=False)
        assert (cudnn.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")  # restored
    finally:
        cudnn.fp32_precision, matmul.fp32_precision = before
    assert_exact(fp32, expected, what="fp32 on CUDA")


@pytest.fixture(scope="module")
def demo():
    return ts.load_model("demo")


@pytest.fixture(scope="module")
def he_image():
    from tilesegment.he import synthetic_slide

    return synthetic_slide((768, 640), seed=3)[0]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_labels_agree_except_at_near_ties(demo, he_image, precision):
    """On a trained model and an H&E-like image, where every class is present: labels of a
    reference that is one class everywhere would agree in any precision."""
    expected = whole_image_logits(he_image, demo)
    shares = np.bincount(expected.argmax(0).ravel(), minlength=3) / expected[0].size
    assert (shares >= 0.02).sum() >= 3, shares  # glass, tissue and nuclei
    labels = ts.segment(he_image, demo, tile_size=256, device="cuda", precision=precision, progress=False)
    assert (labels == expected.argmax(0)).mean() >= 0.999
    assert_labels_match(labels, expected, rtol=REDUCED_PRECISION_RTOL)


class CurrentDevice(torch.nn.Module):
    """Records the current CUDA device and allocates on it, as some models' code does."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    @property
    def geometry(self):
        return self.net.geometry

    def __deepcopy__(self, memo):
        import copy

        twin = CurrentDevice(copy.deepcopy(self.net, memo))
        twin.seen = self.seen
        return twin

    def forward(self, x):
        self.seen.append(torch.cuda.current_device())
        return self.net(x) + torch.zeros(1, device="cuda")  # on "the current device"


def test_each_executor_thread_runs_on_its_own_gpu(big, image):
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    model = CurrentDevice(big)
    ts.segment(image, model, tile_size=256, device=devices, progress=False)
    assert set(model.seen) <= set(range(len(devices))) and model.seen


def test_raw_uint8_normalized_on_the_gpu_equals_the_host_bit_for_bit():
    from tilesegment.testing import normalized_on_device_and_host

    device, host = normalized_on_device_and_host("cuda")
    assert np.array_equal(device.view(np.uint32), host.view(np.uint32))


def test_every_reader_thread_works_when_feeding_a_gpu():
    from test_tiler import SlowArray

    source = SlowArray(np.zeros((256, 256, 3), np.uint8), seconds=0.05)
    net = ts.UNet(3, 2, base_channels=4, depth=2).eval()
    job = ts.prepare(source, net, tile_size=32, batch_size=2, device="cuda:0")
    readers = job.readers
    job.run(progress=False)
    assert source.peak >= min(readers, job.plan.n_tiles)


@pytest.mark.parametrize("autotune", [False, True])
def test_cudnn_autotune_ab_keeps_the_labels(big, image, autotune, capsys):
    """A/B of `ts.cudnn_autotune`: labels agree, and the time is printed for the GPU report."""
    import contextlib
    import time

    expected = whole_image_logits(image, big)
    scope = ts.cudnn_autotune() if autotune else contextlib.nullcontext()
    with scope:
        ts.segment(image, big, tile_size=256, device="cuda:0", progress=False)  # warm-up, autotuning
        start = time.perf_counter()
        labels = ts.segment(image, big, tile_size=256, device="cuda:0", progress=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\ncudnn_autotune={autotune}: {seconds:.3f} s")
    assert_labels_match(labels, expected, rtol=REDUCED_PRECISION_RTOL)


@pytest.mark.parametrize("compile", [False, "reduce-overhead"])
def test_cuda_graphs_ab_keeps_the_labels(big, image, compile, capsys):
    """A/B of CUDA graphs (``compile="reduce-overhead"``): labels agree, the time is printed for
    the GPU report. Batch 3 over the tiles leaves a ragged last batch, which is padded."""
    import time

    expected = whole_image_logits(image, big)
    run = dict(tile_size=256, batch_size=3, device="cuda:0", compile=compile, progress=False)
    ts.segment(image, big, **run)  # warm-up: compilation and graph capture
    start = time.perf_counter()
    labels = ts.segment(image, big, **run)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\ncompile={compile}: {seconds:.3f} s")
    assert_labels_match(labels, expected, rtol=REDUCED_PRECISION_RTOL)


def test_a_cluster_job_records_and_runs_the_precision_its_gpu_workers_mean(big, image, tmp_path):
    distributed = pytest.importorskip("distributed")
    import tifffile

    tifffile.imwrite(tmp_path / "image.tif", image, tile=(64, 64), photometric="rgb")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        with ts.prepare(tmp_path / "image.tif", big, tmp_path / "o.zarr", client=client) as job:
            meant = default_precision(torch.device("cuda", 0))
            assert job.compute.precision == job.record["precision"] == meant
            assert job.batch_size > 1


def test_bench_times_one_gpu_against_that_gpu(tmp_path):
    from tilesegment.bench import bench

    rows = bench(None, "demo", [256], [2], device="cuda", size=512)
    assert {row["device"] for row in rows} == {"cuda:0"}
