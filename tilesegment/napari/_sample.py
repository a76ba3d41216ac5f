"""Sample data for the napari plugin, generated on the spot (no downloads)."""

from __future__ import annotations

import numpy as np

__all__ = ["he_slide", "blobs_volume"]


def he_slide(size: int = 2048, seed: int = 7) -> list[tuple]:
    """A synthetic H&E slide (`tilesegment.he.synthetic_slide`, 0.5 um/px) with crowded nuclei,
    for the demo model."""
    from ..he import synthetic_slide

    rgb, _ = synthetic_slide((size, size), seed, crowding=0.3)
    return [(rgb, {"name": "H&E sample (synthetic)", "rgb": True, "scale": (0.5, 0.5)}, "image")]


def blobs_volume(shape: tuple[int, int, int] = (64, 256, 256), seed: int = 0) -> list[tuple]:
    """A 3-D volume of bright, touching blobs on a noisy background (float32 in [0, 1]),
    anisotropic (2 um planes, 0.5 um pixels) as light-sheet stacks are."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    volume = np.zeros(shape, np.float32)
    centres = rng.integers(0, shape, size=(max(1, int(np.prod(shape) / 20000)), 3))
    volume[tuple(centres.T)] = 1.0
    volume = ndimage.gaussian_filter(volume, sigma=(1.5, 4.0, 4.0))
    volume = volume / volume.max() + rng.normal(0, 0.03, shape).astype(np.float32)
    return [(np.clip(volume, 0, 1).astype(np.float32),
             {"name": "blobs volume (synthetic)", "scale": (2.0, 0.5, 0.5), "colormap": "magma"}, "image")]
