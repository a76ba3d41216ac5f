"""Reference implementations to check tiled results against (like ``numpy.testing``)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .geometry import Geometry
from .io.mirror import normalization_affine
from .io.sources import ImageLike, open_image

__all__ = ["whole_image_logits", "planewise_logits"]


def whole_image_logits(
    image: ImageLike,
    model: torch.nn.Module,
    geometry: Optional[Geometry] = None,
    padding: str = "reflect",
    axes: Optional[str] = None,
) -> np.ndarray:
    """Logits of one forward pass over the whole padded image, shape ``(K, *spatial)``.

    The image (or volume) is normalized like the loader does, padded with
    `padding` (``numpy.pad`` semantics) by the halo before and enough after
    to make a valid input, and the first ``spatial`` output pixels after
    ``geometry.crop`` are returned: ``(K, Y, X)`` or ``(K, Z, Y, X)``. This is
    what tiled inference must equal; it needs memory for the whole image and
    is meant for tests and benchmarks. (A 2-d network over a stack: see
    `planewise_logits`.)
    """
    geometry = geometry or Geometry.of(model)
    source = open_image(image, axes=axes, ndim=geometry.ndim)
    shape = source.shape
    pixels = source.read_region((0,) * len(shape), shape)
    scale, offset = normalization_affine(
        source.dtype, source.channels, getattr(model, "normalization", None)
    )
    n_in = geometry.input_size(shape)
    pad = [(h, m - n - h) for h, m, n in zip(geometry.halo, n_in, shape)] + [(0, 0)]
    padded = np.pad(pixels, pad, mode=padding)
    x = np.moveaxis(padded.astype(np.float32) * scale + offset, -1, 0)
    with torch.inference_mode():
        out = model.eval()(torch.from_numpy(np.ascontiguousarray(x))[None])[0]
    window = tuple(slice(c, c + n) for c, n in zip(geometry.crop, shape))
    return out[(slice(None), *window)].float().numpy()


def planewise_logits(
    stack: ImageLike,
    model: torch.nn.Module,
    axes: str,
    padding: str = "reflect",
) -> np.ndarray:
    """`whole_image_logits` of every plane of a Z or T stack on its own, shape ``(K, Z, Y, X)``:
    what a 2-d network run over the stack must equal."""
    source = open_image(stack, axes=axes)
    if source.ndim != 3:
        raise ValueError(f"expected one stack axis, got axes {source.plan_axes}")
    planes = source.read_region((0,) * 3, source.shape)
    return np.stack([whole_image_logits(plane, model, padding=padding, axes="YXC") for plane in planes], axis=1)
