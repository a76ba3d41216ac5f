"""napari reader: what tilesegment wrote, as lazy multiscale layers.

It claims only OME-Zarr groups with ``tilesegment`` attributes, so
napari-ome-zarr still opens every other ``.zarr``. A result opens as:

- the source image (when ``tilesegment.source`` names a file that can still
  be read) as a lazy multiscale Image, scaled to cover the same extent;
- the class map as multiscale Labels with the class names and colours (or,
  for probabilities and logits, one Image per class);
- ``labels/objects`` as multiscale Labels whose ``features`` are the object
  table found beside the output (``NAME.objects.csv`` / ``.parquet``, where
  ``segment --objects`` writes it), so objects can be coloured by a
  measurement.

Nothing is read but metadata until napari draws: every level is a dask
array over the zarr chunks (or over the source's own tiles).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

__all__ = ["get_reader", "read_output", "get_slide_reader", "read_slide", "image_layer", "is_tilesegment_output",
           "lazy_source", "find_table"]

PathLike = Union[str, os.PathLike]
LayerData = tuple  # (data, kwargs, layer_type): napari's LayerDataTuple


def is_tilesegment_output(path: PathLike) -> bool:
    """Whether `path` is an OME-Zarr group that tilesegment wrote (complete or not).

    Reads one small metadata file; never raises.
    """
    path = Path(path)
    try:
        if (path / "zarr.json").is_file():
            import json

            attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        elif (path / ".zattrs").is_file():
            import json

            attrs = json.loads((path / ".zattrs").read_text())
        else:
            return False
    except (OSError, ValueError):
        return False
    return isinstance(attrs, dict) and isinstance(attrs.get("tilesegment"), dict)


def get_reader(path: Union[PathLike, list]) -> Optional[Callable[[Any], list[LayerData]]]:
    """npe2 reader hook: `read_output` for a tilesegment output, None for anything else.

    Parameters
    ----------
    path : path or list of paths
        What napari was asked to open; a list is claimed only when it holds
        one path.
    """
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return read_output if is_tilesegment_output(path) else None


def read_output(path: Union[PathLike, list]) -> list[LayerData]:
    """The layers of a tilesegment output: source image, class map, objects.

    Parameters
    ----------
    path : path
        The OME-Zarr group `segment` wrote (or a one-element list of it).

    Returns
    -------
    list of (data, kwargs, layer_type)
        napari layer data tuples; every level of every layer is a lazy dask
        array.
    """
    import zarr

    from ..io.ngff import read_ome

    if isinstance(path, (list, tuple)):
        path = path[0]
    path = Path(path)
    group = zarr.open_group(str(path), mode="r")
    record = dict(group.attrs.get("tilesegment", {}))
    levels, scale, translate, axes = _multiscale(group)
    stem = path.name.removesuffix(".zarr").removesuffix(".ome")
    names = record.get("classes") or []
    spatial = [i for i, a in enumerate(axes) if a.get("type") != "channel"]
    meta = {"path": str(path), "tilesegment": record}
    layers: list[LayerData] = []

    source = _source_layer(record.get("source"), levels[0], scale, spatial)
    if source is not None:
        layers.append(source)

    channel = next((i for i, a in enumerate(axes) if a.get("type") == "channel"), None)
    if channel is None:
        ome = read_ome(group)
        n = int(record.get("label_values") or len(names) or 0) or None
        layers.append((_pyramid(levels), {
            "name": f"{stem} classes", "scale": scale, "translate": translate, "multiscale": len(levels) > 1,
            "colormap": class_colormap(n or 2, ome), "metadata": meta, "opacity": 0.5,
            "features": _class_features(n, names),
        }, "labels"))
    else:
        n = levels[0].shape[channel]
        kinds = [f"{stem} {names[k] if k < len(names) else f'class {k}'}" for k in range(n)]
        mode = record.get("mode", "probabilities")
        layers.append((_pyramid(levels), {
            "name": kinds, "channel_axis": channel, "multiscale": len(levels) > 1, "metadata": meta,
            "scale": [s for i, s in enumerate(scale) if i != channel],
            "translate": [t for i, t in enumerate(translate) if i != channel],
            "blending": "additive", "visible": [k == n - 1 for k in range(n)],
            **({"contrast_limits": [0, 255]} if mode == "probabilities" else {}),
        }, "image"))

    if "labels" in group and "objects" in group["labels"]:
        objects = group["labels"]["objects"]
        obj_levels, obj_scale, obj_translate, _ = _multiscale(objects)
        table = find_table(path)
        layers.append((_pyramid(obj_levels), {
            "name": f"{stem} objects", "scale": obj_scale, "translate": obj_translate,
            "multiscale": len(obj_levels) > 1,
            "metadata": {**meta, "table": None if table is None else str(table)},
            "features": _object_features(table),
        }, "labels"))
    return layers


def _pyramid(levels: list) -> Any:
    """Layer data of a pyramid: the list of levels, or the one array when there is a single
    level (napari 0.9 cannot build a multiscale layer of one level)."""
    return levels if len(levels) > 1 else levels[0]


def _multiscale(group: Any) -> tuple[list, list[float], list[float], list[dict]]:
    """Lazy levels, level-0 scale and translation, and axes of an NGFF image group."""
    import dask.array as da

    from ..io.ngff import read_ome

    ms = (read_ome(group).get("multiscales") or [{}])[0]
    datasets = ms.get("datasets") or [{"path": "0"}]
    levels = [da.from_zarr(group[d["path"]]) for d in datasets if d["path"] in group]
    ndim = levels[0].ndim
    scale, translate = [1.0] * ndim, [0.0] * ndim
    for t in datasets[0].get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation":
            translate = [float(v) for v in t["translation"]]
    axes = ms.get("axes") or [{"name": n, "type": "space"} for n in "zyx"[-ndim:]]
    return levels, scale, translate, axes


def class_colormap(n: int, ome: Optional[dict] = None) -> dict:
    """Label value -> RGBA (0..1) of a class map: the output's ``image-label`` colours when it
    has them, else tilesegment's palette; 0 (background) transparent."""
    from ..io.sinks import palette

    colours = {k: tuple(c) for k, c in enumerate(palette(max(n, 2)))}
    for c in ((ome or {}).get("image-label") or {}).get("colors", []):
        if "label-value" in c and "rgba" in c:
            colours[int(c["label-value"])] = tuple(c["rgba"])
    cmap = {k: tuple(v / 255 for v in rgba) for k, rgba in colours.items()}
    cmap[0] = (0.0, 0.0, 0.0, 0.0)
    cmap[None] = (0.0, 0.0, 0.0, 0.0)  # values the output does not know
    return cmap


def _class_features(n: Optional[int], names: list) -> Optional[dict]:
    """Rows per class value, so napari's status bar names the class under the cursor."""
    if not n:
        return None
    return {"index": np.arange(n), "class": [names[k] if k < len(names) else f"class {k}" for k in range(n)]}


def find_table(output: PathLike) -> Optional[Path]:
    """The object table beside `output`, where ``segment --objects`` writes it
    (`tilesegment.objects.export.files_beside`: ``NAME.objects.csv``), or a Parquet one of
    the same name; None when there is none."""
    from ..objects.export import files_beside

    csv, _ = files_beside(output)
    for candidate in (csv, csv.with_suffix(".csv.gz"), csv.with_suffix(".parquet")):
        if candidate.is_file():
            return candidate
    return None


def _object_features(table: Optional[Path]) -> Any:
    """The object table as Labels features: one row per object, ``index`` = its id."""
    if table is None:
        return None
    import pandas as pd

    frame = pd.read_parquet(table) if table.name.endswith(".parquet") else pd.read_csv(table)
    if "id" not in frame:
        return None
    return frame.assign(index=frame["id"].to_numpy())


def _source_layer(source: Optional[dict], level0: Any, scale: list[float], spatial: list[int]) -> Optional[LayerData]:
    """The image the output was made from, as a lazy multiscale Image covering the output's extent."""
    if not source or not source.get("path"):
        return None
    image = _open_source(source["path"], {k: source.get(k) for k in ("axes", "series", "channels")})
    out_shape = [level0.shape[i] for i in spatial]
    if image is None or len(out_shape) != image.ndim:
        return None
    world = [scale[i] for i in spatial]
    return image_layer(image, [w * o / n for w, o, n in zip(world, out_shape, image.shape)])


def _open_source(path: str, options: dict) -> Any:
    """`open_image` of a recorded source, or None when it was moved, changed or is unreadable
    (the result then opens without it)."""
    from .. import open_image
    from ..errors import TileSegmentError
    from ..io.remote import is_url

    if not is_url(path) and not os.path.exists(path):
        return None
    try:
        return open_image(path, **{k: v for k, v in options.items() if v is not None})
    except (TileSegmentError, OSError, ValueError):
        return None


def image_layer(source: Any, scale: Optional[Sequence[float]] = None) -> LayerData:
    """An `ImageSource` as a lazy multiscale napari Image: every pyramid level the file has,
    RGB for 8-bit RGB(A), one layer per channel otherwise.

    Parameters
    ----------
    source : tilesegment.io.sources.ImageSource
    scale : sequence of float, optional
        World size of a full-resolution pixel per spatial axis (default: the
        file's pixel size in micrometres, or 1).
    """
    sources = [source] + ([source.at_level(i) for i in range(1, len(source.levels))]
                          if source.backend.open_level is not None else [])
    data = [lazy_source(s) for s in sources]
    data = [d for k, d in enumerate(data) if k == 0 or d.shape[0] < data[k - 1].shape[0]]
    if scale is None:
        scale = list(source.pixel_size or (1.0,) * source.ndim)
    path = None if source.origin is None else source.origin.image
    kwargs: dict = {"name": source.name, "scale": list(scale), "multiscale": len(data) > 1,
                    "metadata": {"path": os.fspath(path) if isinstance(path, (str, os.PathLike)) else None}}
    if source.channels in (3, 4) and source.dtype == np.uint8:
        kwargs["rgb"] = True
    elif source.channels > 1:
        kwargs["channel_axis"] = source.ndim
    else:
        data = [d[..., 0] for d in data]
    return (data if kwargs["multiscale"] else data[0]), kwargs, "image"


#: Whole-slide formats the slide reader claims (napari's own readers load them whole).
SLIDE_PATTERNS = ("*.svs", "*.ndpi", "*.scn", "*.qptiff", "*.bif")


def get_slide_reader(path: Union[PathLike, list]) -> Optional[Callable[[Any], list[LayerData]]]:
    """npe2 reader hook for whole-slide files: `read_slide`, lazily, level by level."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    name = str(path).lower()
    return read_slide if any(name.endswith(p[1:]) for p in SLIDE_PATTERNS) else None


def read_slide(path: Union[PathLike, list]) -> list[LayerData]:
    """A slide as a lazy multiscale Image layer, read tile by tile as napari draws; the
    segment widget then segments it from the file (decode-once), not from the layer."""
    from .. import open_image

    if isinstance(path, (list, tuple)):
        path = path[0]
    return [image_layer(open_image(path))]


def lazy_source(source: Any) -> Any:
    """A dask array ``(*plan_axes, C)`` over an `ImageSource`, one block per stored tile
    (1024 px where the file has none): napari reads only what it draws.

    Parameters
    ----------
    source : tilesegment.io.sources.ImageSource
    """
    import dask.array as da

    edges = source.chunk_shape or tuple(min(1024, n) for n in source.shape)
    shape = (*source.shape, source.channels)
    chunks = da.core.normalize_chunks((*edges, source.channels), shape)
    dtype = np.float32 if source.dtype == np.float16 else source.dtype

    def block(block_info=None):
        location = block_info[None]["array-location"][:-1]
        return np.ascontiguousarray(source.read_region([a for a, _ in location], [b for _, b in location]))

    return da.map_blocks(block, chunks=chunks, dtype=dtype, meta=np.empty((0,) * len(shape), dtype))
