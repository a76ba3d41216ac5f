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
    assert default_precision(devices[0]) == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


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


def test_a_cluster_job_records_and_runs_the_precision_its_gpu_workers_mean(big, image, tmp_path):
    distributed = pytest.importorskip("distributed")
    import tifffile

    tifffile.imwrite(tmp_path / "image.tif", image, tile=(64, 64), photometric="rgb")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        with ts.prepare(tmp_path / "image.tif", big, tmp_path / "o.zarr", device=client) as job:
            meant = default_precision(torch.device("cuda", 0))
            assert job.compute.precision == job.record["precision"] == meant
            assert job.batch_size > 1


def test_bench_times_one_gpu_against_that_gpu(tmp_path):
    from tilesegment.bench import bench

    rows = bench(None, "demo", [256], [2], device="cuda", size=512)
    assert {row["device"] for row in rows} == {"cuda:0"}
