"""Reference implementations to check tiled results against (like ``numpy.testing``)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .geometry import Geometry
from .io.mirror import normalization_affine
from .io.sources import ImageLike, open_image

__all__ = ["whole_image_logits"]


def whole_image_logits(
    image: ImageLike,
    model: torch.nn.Module,
    geometry: Optional[Geometry] = None,
    padding: str = "reflect",
    axes: Optional[str] = None,
) -> np.ndarray:
    """Logits of one forward pass over the whole padded image, shape ``(K, Y, X)``.

    The image is normalized like the loader does, padded with `padding`
    (``numpy.pad`` semantics) by the halo before and enough after to make a
    valid input, and the first ``(Y, X)`` output pixels after ``geometry.crop``
    are returned. This is what tiled inference must equal; it needs memory for
    the whole image and is meant for tests and benchmarks.
    """
    geometry = geometry or Geometry.of(model)
    source = open_image(image, axes=axes)
    (ny, nx), (hy, hx) = source.shape, geometry.halo
    pixels = source.read(0, ny, 0, nx)
    scale, offset = normalization_affine(
        source.dtype, source.channels, getattr(model, "normalization", None)
    )
    n_in = geometry.input_size((ny, nx))
    pad = ((hy, n_in[0] - ny - hy), (hx, n_in[1] - nx - hx), (0, 0))
    padded = np.pad(pixels, pad, mode=padding)
    x = (padded.astype(np.float32) * scale + offset).transpose(2, 0, 1)
    with torch.inference_mode():
        out = model.eval()(torch.from_numpy(np.ascontiguousarray(x))[None])[0]
    cy, cx = geometry.crop
    return out[:, cy : cy + ny, cx : cx + nx].float().numpy()
