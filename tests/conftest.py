"""Shared fixtures: small networks and images made in code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tilesegment as ts

SHARED_SVS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "small_HE.svs"


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
