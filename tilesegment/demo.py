"""`tilesegment demo`: a synthetic H&E slide, segmented end to end with the bundled model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import OutputExistsError

__all__ = ["run_demo", "overview", "outline", "DemoResult", "CLASS_COLOURS", "write_tiff_pyramid"]

#: Colour per demo class (None: not drawn). Strong, light colours stay legible
#: on purple-pink H&E, where a translucent fill turned the slide grey. The
#: overview outlines whole nuclei (interior 2 with its boundary 3) in class 2's colour.
CLASS_COLOURS = (None, (0, 235, 90), (255, 235, 0), (255, 140, 0))
_OVERVIEW_EDGE = 1024


@dataclass(frozen=True)
class DemoResult:
    """Where `run_demo` put things, and how well it did on the synthetic truth."""

    slide: Path
    output: Path
    overview: Path
    seconds: float
    scores: dict
    objects: int = 0  #: objects found (instance labels in ``output``/labels/objects)
    table: Optional[Path] = None
    geojson: Optional[Path] = None


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


def outline(labels: np.ndarray) -> np.ndarray:
    """Pixels of `labels` (non-zero) that touch a pixel of another value: the objects' edges."""
    edge = np.zeros(labels.shape, bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edge & (labels != 0)


def overview(rgb: np.ndarray, labels: np.ndarray, objects: Optional[np.ndarray] = None) -> np.ndarray:
    """Side-by-side RGB image and the same image with outlines, as one uint8 image.

    Tissue (class 1 and what lies in it) gets its border against the glass;
    nuclei (classes 2 and 3, interior and boundary) get one outline per
    object of `objects` (instance labels; without them, the outline of the
    nuclei mask), so touching nuclei stay apart. The slide itself is left as it is: a translucent fill turned
    purple H&E grey.
    """
    drawn = rgb.copy()
    tissue, nuclei = CLASS_COLOURS[1], CLASS_COLOURS[2]
    drawn[outline((labels != 0).astype(np.uint8))] = tissue
    mask = (labels == 2) | (labels == 3)
    drawn[outline(np.where(mask, objects, 0) if objects is not None else mask.astype(np.uint8))] = nuclei
    gap = np.full((rgb.shape[0], 8, 3), 255, np.uint8)
    return np.concatenate([rgb, gap, drawn], axis=1)


def _geojson(path: Path, nuclei, tissue) -> Path:
    """One QuPath GeoJSON: the nuclei as detections, then the tissue as annotations."""
    import gzip
    import json
    import tempfile

    features = []
    with tempfile.TemporaryDirectory() as tmp:
        for objs, annotations in ((nuclei, []), (tissue, [1])):
            part = objs.to_geojson(Path(tmp) / "part.geojson", overwrite=True, annotation_classes=annotations)
            features += json.loads(part.read_text())["features"]
    with gzip.open(path, "wt") as f:
        json.dump({"type": "FeatureCollection", "features": features}, f)
    return path


def _write_jpeg(path: Path, image: np.ndarray) -> Path:
    import imagecodecs

    path.write_bytes(imagecodecs.jpeg_encode(np.ascontiguousarray(image), level=80))
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
    """Segment a synthetic (or given) H&E slide with the demo model, find its nuclei, draw an overview.

    The nuclei are the objects of the model's instance recipe
    (``metadata["instances"]``, recorded in the output): the interiors
    (class 2) are the seeds, grown into the boundary class within a few
    pixels, so touching nuclei stay apart. Tissue is labelled on its own
    (plain connected components of class 1), because growing it too would
    let it take the nuclei's boundary pixels.

    Parameters
    ----------
    out_dir : path
        Folder for ``slide.tif`` (when generated), ``segmentation.zarr`` (with
        the nuclei as ``labels/objects``), ``objects.csv`` (the nuclei),
        ``objects.geojson.gz`` (QuPath: nuclei as detections, tissue as
        annotations) and ``overview.jpg``; created if missing.
    size : int
        Edge of the generated slide in pixels (0.5 um/px), with crowded
        clusters of touching nuclei (``synthetic_slide(..., crowding=0.3)``).
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
    from .he import CLASSES, dice, instance_scores, synthetic_slide
    from .io.sources import open_image
    from .objects import label_objects

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result_path, png_path = out / "segmentation.zarr", out / "overview.jpg"
    if result_path.exists() and not overwrite:
        raise OutputExistsError(
            f"{str(result_path)!r} exists from an earlier demo; pass --overwrite or another folder"
        )
    truth = None
    if image is None:
        rgb, truth, instances = synthetic_slide((size, size), seed, crowding=0.3, boundary=True, instances=True)
        slide = write_tiff_pyramid(out / "slide.tif", rgb)
    else:
        slide = Path(image)
    start = time.perf_counter()
    labels = segment(slide, "demo", result_path, device=device, overwrite=overwrite, progress=progress)
    seconds = time.perf_counter() - start
    objs = label_objects(result_path, overwrite=overwrite, progress=progress)  # the recorded recipe: nuclei
    tissue = label_objects(np.asarray(labels), classes=[1], class_names=CLASSES, progress=False)
    table = objs.to_table(out / "objects.csv", overwrite=True)
    geojson = _geojson(out / "objects.geojson.gz", objs, tissue)

    source = open_image(slide)
    step = max(1, int(np.ceil(max(source.shape) / _OVERVIEW_EDGE)))
    small_rgb = source.read(0, source.shape[0], 0, source.shape[1], step=step)
    source.close()
    small = labels[::step, ::step]
    _write_jpeg(png_path, overview(small_rgb, small, objs.labels[::step, ::step]))
    scores = {}
    if truth is not None:
        scores = {f"dice_{name}": round(dice(small == k, truth[::step, ::step] == k), 3)
                  for k, name in enumerate(CLASSES[:2])}
        scores["dice_nuclei"] = round(dice(small >= 2, truth[::step, ::step] >= 2), 3)
        found = instance_scores(objs.labels[:], instances)
        scores.update(nuclei_f1=found["f1"], nuclei_pq=found["pq"])
    return DemoResult(slide, result_path, png_path, seconds, scores, len(objs), table, geojson)
