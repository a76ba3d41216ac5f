"""`tilesegment demo`: a synthetic H&E slide, segmented end to end with the bundled model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import OutputExistsError

__all__ = ["run_demo", "overview", "DemoResult", "CLASS_COLOURS", "write_tiff_pyramid"]

#: RGB overlay colour and opacity per demo class; None leaves the pixel as it is.
CLASS_COLOURS = (None, ((40, 170, 90), 0.3), ((255, 210, 0), 0.8))
_OVERVIEW_EDGE = 1024


@dataclass(frozen=True)
class DemoResult:
    """Where `run_demo` put things, and how well it did on the synthetic truth."""

    slide: Path
    output: Path
    overview: Path
    seconds: float
    scores: dict


def write_tiff_pyramid(path: Union[str, os.PathLike], rgb: np.ndarray, pixel_size: float = 0.5) -> Path:
    """Write `rgb` as a tiled, pyramidal, JPEG-compressed TIFF with its pixel size (um)."""
    import tifffile

    path = Path(path)
    levels = [rgb]
    while max(levels[-1].shape[:2]) > 1024:
        levels.append(levels[-1][::2, ::2])
    options = dict(tile=(256, 256), photometric="rgb", compression="jpeg", resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, level in enumerate(levels):
            px_per_cm = 1e4 / (pixel_size * 2**i)
            tif.write(level, subifds=len(levels) - 1 if i == 0 else None,
                      subfiletype=1 if i else 0, resolution=(px_per_cm, px_per_cm), **options)
    return path


def overview(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Side-by-side RGB image and its coloured label overlay, as one uint8 image."""
    blend = rgb.astype(np.float32).copy()
    for k, style in enumerate(CLASS_COLOURS):
        if style is not None:
            colour, alpha = style
            mask = labels == k
            blend[mask] = (1 - alpha) * blend[mask] + alpha * np.asarray(colour, np.float32)
    gap = np.full((rgb.shape[0], 8, 3), 255, np.uint8)
    return np.concatenate([rgb, gap, blend.astype(np.uint8)], axis=1)


def _write_png(path: Path, image: np.ndarray) -> Path:
    import imagecodecs

    path.write_bytes(imagecodecs.png_encode(np.ascontiguousarray(image)))
    return path


def run_demo(
    out_dir: Union[str, os.PathLike] = "tilesegment-demo",
    size: int = 3072,
    seed: int = 7,
    image: Optional[Union[str, os.PathLike]] = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> DemoResult:
    """Segment a synthetic (or given) H&E slide with the demo model and draw an overview.

    Parameters
    ----------
    out_dir : path
        Folder for ``slide.tif`` (when generated), ``segmentation.zarr`` and
        ``overview.png``; created if missing.
    size : int
        Edge of the generated slide in pixels (0.5 um/px).
    seed : int
        Seed of the generated slide.
    image : path, optional
        Segment this H&E slide instead of generating one.
    device, progress
        As for `segment`.
    overwrite : bool
        Replace an earlier demo output in `out_dir`.
    """
    import time

    from .api import segment
    from .he import CLASSES, dice, synthetic_slide
    from .io.sources import open_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result_path, png_path = out / "segmentation.zarr", out / "overview.png"
    if result_path.exists() and not overwrite:
        raise OutputExistsError(
            f"{str(result_path)!r} exists from an earlier demo; pass --overwrite or another folder"
        )
    truth = None
    if image is None:
        rgb, truth = synthetic_slide((size, size), seed)
        slide = write_tiff_pyramid(out / "slide.tif", rgb)
    else:
        slide = Path(image)
    start = time.perf_counter()
    labels = segment(slide, "demo", result_path, device=device, overwrite=overwrite, progress=progress)
    seconds = time.perf_counter() - start

    source = open_image(slide)
    step = max(1, int(np.ceil(max(source.shape) / _OVERVIEW_EDGE)))
    small_rgb = source.read(0, source.shape[0], 0, source.shape[1], step=step)
    source.close()
    small = labels[::step, ::step]
    _write_png(png_path, overview(small_rgb, small))
    scores = {}
    if truth is not None:
        truth = truth[::step, ::step]
        scores = {f"dice_{name}": round(dice(small == k, truth == k), 3)
                  for k, name in enumerate(CLASSES)}
    return DemoResult(slide, result_path, png_path, seconds, scores)
