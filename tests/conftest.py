"""Shared fixtures: small networks and images made in code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tilesegment as ts

SHARED_SVS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "small_HE.svs"

#: tests/plugins holds installable plug-ins that test_formats puts on the path of its own
#: subprocesses; collecting the folder would put it on this process's path, and its entry
#: points in every test's registry.
collect_ignore = ["plugins"]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on CUDA and asserts the GPU contract; skipped without CUDA")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_gpu(request, monkeypatch):
    """Run every test not marked ``gpu`` on the CPU in fp32, on any machine.

    On a CUDA host ``device="auto"`` means every GPU and ``precision="auto"``
    means bf16, so the 1e-5 exactness assertions of the CPU suite would fail
    there by design. Hiding CUDA makes "auto" mean the CPU and fp32, here and
    in the subprocesses and cluster workers that tests start.
    """
    if request.node.get_closest_marker("gpu"):
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def small_unet(in_channels: int = 3, num_classes: int = 3, base: int = 4, depth: int = 2, seed: int = 0):
    """A tiny valid U-Net with fixed random weights (biases spread so labels vary)."""
    torch.manual_seed(seed)
    net = ts.UNet(in_channels, num_classes, base_channels=base, depth=depth)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    return net.eval()


@pytest.fixture
def rgb_image() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(150, 131, 3), dtype=np.uint8)


@pytest.fixture
def rgb_tiff(tmp_path, rgb_image) -> Path:
    """A tiled RGB TIFF with a resolution tag (2 um/px)."""
    import tifffile

    path = tmp_path / "image.tif"
    tifffile.imwrite(path, rgb_image, tile=(64, 64), photometric="rgb",
                     resolution=(5000, 5000), resolutionunit="CENTIMETER")
    return path


@pytest.fixture
def model_file(tmp_path) -> Path:
    return ts.save_model(small_unet(), tmp_path / "model.pt")


@pytest.fixture
def shared_svs() -> Path:
    if not SHARED_SVS.exists():
        pytest.skip("../shared/data/small_HE.svs is not available")
    return SHARED_SVS
