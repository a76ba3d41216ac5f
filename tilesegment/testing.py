"""Reference implementations and assertions to check tiled results against (like ``numpy.testing``).

The exactness contract of tilesegment is a bound on the largest error
relative to the largest magnitude of the reference:
``max |a - b| / max |reference| <= 1e-5`` in float32 (`assert_exact`). It
holds on every CPU and GPU in fp32, whichever kernels oneDNN or cuDNN pick.
Labels are the argmax of logits, so two runs within the contract can still
disagree where the top two logits are a near tie; `assert_labels_match`
accepts exactly those pixels and no others.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .geometry import Geometry
from .io.mirror import normalization_affine
from .io.sources import ImageLike, open_image
from .models.base import describe

__all__ = ["normalized_on_device_and_host", "whole_image_logits", "planewise_logits", "relative_error", "assert_exact",
           "assert_labels_match"]

#: The exactness contract for float32 paths: max |a - b| / max |reference|.
RTOL = 1e-5


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
        source.dtype, source.channels, describe(model).normalization
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


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """``max |actual - reference| / max |reference|``, computed in float64.

    Examples
    --------
    >>> relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.5]))
    0.2
    """
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    if actual.shape != reference.shape:
        raise AssertionError(f"shapes differ: {actual.shape} against the reference's {reference.shape}")
    scale = np.abs(reference).max() if reference.size else 0.0
    return float(np.abs(actual - reference).max() / max(scale, np.finfo(np.float64).tiny)) if actual.size else 0.0


def assert_exact(actual: np.ndarray, reference: np.ndarray, rtol: float = RTOL, what: str = "") -> None:
    """Assert the exactness contract: ``relative_error(actual, reference) <= rtol``.

    Parameters
    ----------
    actual, reference : array_like
        Same shapes; `reference` sets the scale (its largest magnitude).
    rtol : float
        1e-5 for float32 paths; a looser bound where the arithmetic differs
        on purpose (bf16, another runtime).
    what : str
        Named in the message when the assertion fails.

    Examples
    --------
    >>> assert_exact(np.array([100.0, 1.0]), np.array([100.0, 1.0005]))  # 5e-6 of the largest value
    """
    error = relative_error(actual, reference)
    if not error <= rtol:
        raise AssertionError(f"{what + ': ' if what else ''}max |a - b| / max |ref| = {error:.3g} > {rtol:g}")


def assert_labels_match(labels: np.ndarray, logits: np.ndarray, rtol: float = RTOL, axis: int = 0) -> None:
    """Assert that `labels` is the argmax of `logits` wherever that is not a near tie.

    A run whose logits are within `rtol` of `logits` (the contract) can only
    pick a class whose reference logit is within ``2 * rtol * max |logits|``
    of the top one; every pixel must hold such a class. Where the margin
    between the top two logits is larger, that is the top class exactly.

    Parameters
    ----------
    labels : ndarray of int
        The label map, shaped like `logits` without `axis`.
    logits : ndarray of float
        Reference logits (for example `whole_image_logits`), classes on `axis`.
    rtol : float
        The bound that the run producing `labels` meets on its logits.
    axis : int
        The class axis of `logits`.

    Examples
    --------
    >>> logits = np.array([[5.0, 1.0, 2.0], [1.0, 1.0, 2.0 + 1e-6]])   # (K, X); pixel 2 is a near tie
    >>> assert_labels_match(np.array([0, 1, 0]), logits)
    """
    logits = np.moveaxis(np.asarray(logits, np.float64), axis, 0)
    labels = np.asarray(labels)
    if labels.shape != logits.shape[1:]:
        raise AssertionError(f"label shape {labels.shape} does not match the logits' {logits.shape[1:]}")
    if labels.size == 0:
        return
    tolerance = 2 * rtol * np.abs(logits).max()
    inside = (labels >= 0) & (labels < len(logits))
    chosen = np.take_along_axis(logits, np.clip(labels, 0, len(logits) - 1)[None].astype(np.intp), 0)[0]
    wrong = ~inside | (chosen < logits.max(0) - tolerance)
    if wrong.any():
        where = tuple(int(i) for i in np.argwhere(wrong)[0])
        raise AssertionError(
            f"{int(wrong.sum())} of {labels.size} labels are not the top class, nor within "
            f"{tolerance:.3g} of it; first at {where}: label {labels[where]}, logits {logits[(slice(None), *where)]}"
        )


def normalized_on_device_and_host(device) -> tuple[np.ndarray, np.ndarray]:
    """Every uint8 value in 3 channels with ImageNet mean/std, normalized twice: raw on `device`
    by the executor (``input_affine``, one fused multiply-add) and by the host gather. The raw
    upload is exact when the two are equal bit for bit."""
    from .executor import Executor
    from .io.mirror import gather
    from .process import exact_fp32

    class Identity(torch.nn.Module):
        geometry = Geometry(halo=0, step=1)

        def forward(self, x):
            return x

    scale, offset = normalization_affine(np.uint8, 3, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    pixels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    host = np.empty((3, 1, 256), np.float32)
    gather(pixels, np.arange(1), np.arange(256), scale, offset, host)
    executor = Executor(Identity(), device, precision="fp32", input_affine=(scale, offset))
    with exact_fp32():
        on_device = executor(np.ascontiguousarray(pixels.transpose(2, 0, 1))[None]).numpy()[0]
    return on_device, host
