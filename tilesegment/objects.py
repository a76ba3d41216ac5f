"""Whole objects from a label map: instance ids across chunks, a table, QuPath GeoJSON.

`label_objects` finds the connected components of each class of a label map
chunk by chunk and joins them across chunk faces (see `tilesegment._components`),
so the instance labels equal ``scipy.ndimage.label`` of the whole map, class
by class, in memory bounded by a band of chunks plus a table that grows with
the number of objects. Objects are numbered 1..N by their first pixel in
raster order (row-major), so the numbering is deterministic and the same on a
cluster as locally.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from ._components import Grid, Merged, Merger, label_chunk, measure_chunk
from .errors import Cancelled, InputError, OutputExistsError, UsageError
from .report import Cancel, Reporter, TqdmReporter, as_reporter, progress_of

__all__ = ["label_objects", "Objects", "write_class_names", "DEFAULT_CHUNK"]

#: Edge of the chunks an in-memory map is processed in (2-D; 3-D maps use 128).
DEFAULT_CHUNK = 1024
#: Pixels per processing chunk aimed at when a zarr map is stored in smaller chunks.
_TARGET_PIXELS = 1 << 20


# ----------------------------------------------------------------------------- the input


@dataclass
class _Input:
    """A label map (or a probabilities/logits map read as its argmax), chunk by chunk.

    Plain and picklable: distributed tasks receive it and read their chunks.
    """

    array: Any  # spatial axes last; channels first for probabilities/logits
    kind: str  # "labels", "probabilities" or "logits"
    ndim: int  # spatial axes: 2 or 3
    grid: Grid  # 3-D (a 2-D map has one chunk along the leading axis)
    pixel_size: Optional[tuple[float, ...]] = None
    names: dict = field(default_factory=dict)
    colours: dict = field(default_factory=dict)
    num_classes: Optional[int] = None
    group_path: Optional[Path] = None
    probabilities: Any = None  # (C, *spatial) array for a labels map, or None
    ngff: str = "0.5"  # version of the segment output the labels go into
    ours: bool = False  # a store tilesegment wrote (the only kind labels are added to)
    read_only: bool = False  # a group passed in on a read-only store

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[-self.ndim:])

    @property
    def has_probability(self) -> bool:
        return self.kind != "labels" or self.probabilities is not None

    def read(self, flat: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Chunk `flat` as 3-D arrays: the labels, and the probability of each pixel's class."""
        region = self.grid.region(flat)
        spatial = region[3 - self.ndim:]
        block = np.asarray(self.array[(..., *spatial)])
        if self.kind == "labels":
            labels = block
            prob = None
            if self.probabilities is not None:
                probs = np.asarray(self.probabilities[(..., *spatial)])
                if labels.size and int(labels.max()) >= probs.shape[0]:
                    raise InputError(f"the labels hold class {int(labels.max())} but the probabilities have "
                                     f"only {probs.shape[0]} channels; pass the probabilities of the same run")
                prob = np.take_along_axis(probs, labels[None].astype(np.intp), 0)[0]
                prob = prob.astype(np.float32) / (255.0 if probs.dtype == np.uint8 else 1.0)
        else:
            labels = np.argmax(block, axis=0).astype(np.uint16 if block.shape[0] > 255 else np.uint8)
            top = block.max(axis=0).astype(np.float32)
            if self.kind == "probabilities":
                prob = top / (255.0 if block.dtype == np.uint8 else 1.0)
            else:  # softmax of the top logit
                prob = 1.0 / np.exp(block.astype(np.float32) - top[None]).sum(axis=0)
        shape3 = (1,) * (3 - self.ndim) + labels.shape
        return labels.reshape(shape3), None if prob is None else prob.reshape(shape3)

    def classes_in(self, labels: np.ndarray) -> list[int]:
        """The non-zero values of a chunk (the classes when none were named)."""
        if labels.dtype.itemsize <= 2 and labels.dtype.kind == "u":
            return [int(v) for v in np.flatnonzero(np.bincount(labels.ravel())) if v]
        return [int(v) for v in np.unique(labels) if v]


def _ngff(group: Any) -> str:
    """The NGFF version of a group: 0.4 keeps its keys at the top of zarr v2 attributes."""
    return "0.5" if "ome" in group.attrs or group.metadata.zarr_format == 3 else "0.4"


def _ome(group: Any) -> dict:
    """The group's OME metadata, in either NGFF version."""
    attrs = group.attrs.asdict()
    return dict(attrs.get("ome", attrs)) if _ngff(group) == "0.5" else dict(attrs)


def _set_ome(group: Any, meta: dict) -> None:
    """Write OME metadata where the group's NGFF version keeps it."""
    if _ngff(group) == "0.5":
        group.attrs["ome"] = meta
    else:
        group.attrs.update(meta)


def _open_input(labels: Any, chunks: Any, probabilities: Any) -> _Input:
    import zarr

    group, group_path = None, None
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        if not path.exists():
            raise InputError(f"{str(path)!r} does not exist; pass the OME-Zarr written by segment")
        try:
            node = zarr.open(path, mode="r")
        except Exception as exc:
            raise InputError(f"{str(path)!r} is not a zarr store ({exc}); pass the OME-Zarr written by "
                             "segment, or an integer array") from None
        if isinstance(node, zarr.Group):
            group, group_path = node, path
        else:
            labels = node
    elif isinstance(labels, zarr.Group):
        group = labels
        root = getattr(group.store, "root", None)
        if root is not None:
            group_path = Path(root) / group.path
    if group is not None:
        inp = _open_group(group, group_path, chunks, probabilities)
        inp.read_only = group_path is not None and not isinstance(labels, (str, os.PathLike)) and bool(
            getattr(group.store, "read_only", False))
        return inp
    return _open_array(labels, chunks, probabilities, kind="labels", name="the array")


def _open_group(group: Any, path: Optional[Path], chunks: Any, probabilities: Any) -> _Input:
    where = str(path) if path is not None else "the zarr group"
    ome = _ome(group)
    multiscales = ome.get("multiscales") or [{}]
    # The full resolution: the first dataset of an NGFF image (other writers name it "s0"), or "0".
    full = (multiscales[0].get("datasets") or [{"path": "0"}])[0].get("path", "0")
    if full not in group:
        raise InputError(f"{where!r} is not a labels image: it has no array {full!r}; pass the OME-Zarr "
                         "written by segment")
    axes = multiscales[0].get("axes", [])
    if any(a.get("type") == "time" for a in axes):
        raise InputError(f"{where!r} has a time axis: objects do not continue from one time point to "
                         "the next; label each time point on its own, e.g. "
                         "ts.label_objects(zarr.open_array(path + '/0')[t])")
    channel = any(a.get("type") == "channel" for a in axes)
    mode = dict(group.attrs.get("tilesegment", {})).get("mode")
    kind = mode if mode in ("probabilities", "logits") else "labels"
    if channel and kind == "labels":
        raise InputError(f"{where!r} is not a labels image: it has a channel axis and no probabilities "
                         "or logits of a segment run; pass the labels output of segment")
    inp = _open_array(group[full], chunks, probabilities, kind=kind, name=repr(where))
    inp.group_path = path
    inp.ours = "tilesegment" in group.attrs
    inp.ngff = _ngff(group)
    inp.pixel_size = _pixel_size(multiscales[0], inp.ndim)
    label_meta = ome.get("image-label", {})
    colours = {int(c["label-value"]): tuple(int(v) for v in c["rgba"][:3])
               for c in label_meta.get("colors", []) if "label-value" in c}
    names = dict(enumerate(dict(group.attrs.get("tilesegment", {})).get("classes", [])))
    names.update({int(p["label-value"]): str(p.get("class", p.get("name")))
                  for p in label_meta.get("properties", []) if "label-value" in p})
    record = dict(group.attrs.get("tilesegment", {}))
    if kind == "labels" and colours:  # a label image (its colours list every value)
        inp.num_classes = max(colours) + 1
    elif kind == "labels" and "label_values" in record:  # a class map written by segment
        inp.num_classes = int(record["label_values"])
    elif kind != "labels":
        inp.num_classes = int(group[full].shape[0])
    inp.names, inp.colours = names, colours
    return inp


def _pixel_size(multiscale: dict, ndim: int) -> Optional[tuple[float, ...]]:
    axes = multiscale.get("axes", [])
    spatial = [i for i, a in enumerate(axes) if a.get("type") == "space"]
    if len(spatial) < ndim or any(axes[i].get("unit") != "micrometer" for i in spatial[-ndim:]):
        return None
    try:
        scale = next(t["scale"] for t in multiscale["datasets"][0]["coordinateTransformations"]
                     if t.get("type") == "scale")
    except (KeyError, IndexError, StopIteration):
        return None
    return tuple(float(scale[i]) for i in spatial[-ndim:])


def _open_array(array: Any, chunks: Any, probabilities: Any, kind: str, name: str) -> _Input:
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        array = np.asarray(array)
    channels = 0 if kind == "labels" else 1
    ndim = len(array.shape) - channels
    dtype = np.dtype(array.dtype)
    if kind == "labels" and dtype.kind not in "uib":
        raise InputError(f"{name} is not a labels image: its dtype is {dtype}; pass integer class labels "
                         "(the labels output of segment), not an image or probabilities")
    if ndim not in (2, 3):
        raise InputError(f"{name} is not a labels image: it has shape {tuple(array.shape)}; expected a "
                         "2-D (Y, X) or 3-D (Z, Y, X) map of class labels")
    if dtype.kind == "b":
        array = array.astype(np.uint8) if isinstance(array, np.ndarray) else array
    grid = _grid(array, ndim, chunks)
    probs = None
    if probabilities is not None:
        if kind != "labels":
            raise UsageError("probabilities= is for a labels map; this input already holds probabilities")
        probs = _open_probabilities(probabilities)
        if tuple(probs.shape[1:]) != tuple(array.shape):
            raise InputError(f"probabilities of shape {tuple(probs.shape)} do not match the labels "
                             f"{tuple(array.shape)}; expected (classes, {', '.join(map(str, array.shape))})")
    return _Input(array, kind, ndim, grid, probabilities=probs)


def _open_probabilities(probabilities: Any) -> Any:
    import zarr

    if isinstance(probabilities, (str, os.PathLike)):
        node = zarr.open(probabilities, mode="r")
        probabilities = node["0"] if isinstance(node, zarr.Group) else node
    return probabilities


def _grid(array: Any, ndim: int, chunks: Any) -> Grid:
    shape = tuple(int(n) for n in array.shape[-ndim:])
    if chunks is not None:
        edge = (int(chunks),) * ndim if np.isscalar(chunks) else tuple(int(c) for c in chunks)
        if len(edge) != ndim or min(edge) < 1:
            raise UsageError(f"chunks {chunks!r} must be a positive edge or one per axis ({ndim} axes)")
    else:
        stored = getattr(array, "chunks", None)
        if stored is not None and len(stored) and isinstance(stored[0], tuple):  # dask
            edge = tuple(max(c) for c in stored[-ndim:])
        elif stored is not None and len(stored):  # zarr: whole stored chunks, about a megapixel each
            edge = [int(c) for c in stored[-ndim:]]
            while np.prod(edge) < _TARGET_PIXELS:
                growable = [a for a in range(ndim) if edge[a] < shape[a]]
                if not growable:
                    break
                axis = min(growable, key=lambda a: (edge[a], -a))  # the shortest edge, x first
                edge[axis] *= 2
            edge = tuple(edge)
        else:
            edge = (DEFAULT_CHUNK,) * 2 if ndim == 2 else (128,) * 3
    full = (1,) * (3 - ndim) + shape
    return Grid.regular(full, (1,) * (3 - ndim) + tuple(min(e, n) for e, n in zip(edge, shape)))


def _check_classes(inp: _Input, classes: Optional[Sequence[int]]) -> Optional[tuple[int, ...]]:
    if classes is None:
        if inp.num_classes is not None:
            return tuple(range(1, inp.num_classes))
        return None
    try:
        values = tuple(int(k) for k in classes)
    except (TypeError, ValueError):
        raise UsageError(f"classes {classes!r} must be a list of class numbers, e.g. [2]") from None
    if not values:
        raise UsageError("classes is empty; name at least one class, or leave it out for all but 0")
    for k in values:
        if inp.num_classes is not None and not 0 <= k < inp.num_classes:
            names = ", ".join(f"{i} {inp.names.get(i, '')}".strip() for i in range(inp.num_classes))
            raise UsageError(f"class {k} is out of range: the map has classes 0..{inp.num_classes - 1} "
                             f"({names})")
        if k < 0:
            raise UsageError(f"class {k} is out of range: classes are non-negative label values")
    return tuple(sorted(set(values)))


# ----------------------------------------------------------------------------- the passes


@dataclass(frozen=True)
class _Task:
    """What a chunk task needs (plain and picklable)."""

    input: _Input
    classes: Optional[tuple[int, ...]]
    connectivity: int

    def measure(self, flat: int):
        labels, prob = self.input.read(flat)
        classes = self.classes if self.classes is not None else self.input.classes_in(labels)
        result, _ = measure_chunk(flat, self.input.grid, labels, prob, classes, self.connectivity)
        return result

    def instances(self, flat: int, lookup: np.ndarray) -> np.ndarray:
        """The chunk's object ids (labelled again: cheaper than storing the local map)."""
        labels, _ = self.input.read(flat)
        classes = self.classes if self.classes is not None else self.input.classes_in(labels)
        local, _ = label_chunk(labels, classes, self.connectivity)
        return lookup[local].reshape(labels.shape[3 - self.input.ndim:])


def _measure_many(task: _Task, chunks: list[int]) -> list:
    return [task.measure(i) for i in chunks]


def _write_many(task: _Task, chunks: list[int], lookups: list, array_path: str) -> int:
    import zarr

    array = zarr.open_array(array_path, mode="r+")
    for i, lookup in zip(chunks, lookups):
        region = task.input.grid.region(i)[3 - task.input.ndim:]
        array[region] = task.instances(i, lookup)
    return len(chunks)


def _advance(reporter: Reporter, n: int = 1) -> None:
    """Count `n` chunks done; stop the pass if the caller cancelled it."""
    reporter.advance(n)
    if reporter.cancelled():
        done = progress_of(reporter)
        stopped = f"objects pass cancelled {done} chunk steps" if done else "objects pass cancelled"
        raise Cancelled(f"{stopped}; no objects were written")


def _measure_local(task: _Task, reporter: Reporter, workers: int) -> Merged:
    grid = task.input.grid
    merger = Merger(grid, task.connectivity)
    with ThreadPoolExecutor(workers) as pool:
        # a bounded window of chunks in flight, merged in raster order: shells of about a band
        pending = []
        try:
            for flat in range(grid.n_chunks):
                pending.append(pool.submit(task.measure, flat))
                if len(pending) > 2 * workers:
                    merger.add(pending.pop(0).result())
                    _advance(reporter)
            for future in pending:
                merger.add(future.result())
                _advance(reporter)
        except Cancelled:
            for future in pending:
                future.cancel()
            raise
    return merger.finish()


def _groups(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


def _measure_cluster(task: _Task, client: Any, reporter: Reporter, group: int) -> Merged:
    from distributed import as_completed

    grid = task.input.grid
    merger = Merger(grid, task.connectivity)
    spec = client.scatter(task, broadcast=True, hash=False)
    futures = [client.submit(_measure_many, spec, chunks, pure=False) for chunks in _groups(grid.n_chunks, group)]
    try:
        for future in as_completed(futures):
            for result in future.result():
                merger.add(result)
            _advance(reporter, len(future.result()))
    except BaseException:
        client.cancel(futures)
        raise
    return merger.finish()


# ----------------------------------------------------------------------------- outputs


def _objects_path(inp: _Input) -> Path:
    return inp.group_path / "labels" / "objects"


def _check_outputs(inp: _Input, output: Any, overwrite: bool) -> Any:
    """Where the instance labels go: "group", a path/store, or None (memory)."""
    from .io.sinks import ZarrSink

    if output is not None:
        ZarrSink.check_output(output, overwrite)
        return output
    if inp.group_path is not None:
        where = str(inp.group_path)
        if not inp.ours:
            raise UsageError(f"{where!r} was not written by tilesegment segment, so it is left as it is; "
                             "pass output= (CLI: --output OBJECTS.zarr) to write the objects elsewhere")
        if inp.read_only or not os.access(inp.group_path, os.W_OK):
            raise UsageError(f"{where!r} is read-only; pass output= (CLI: --output OBJECTS.zarr) to write "
                             "the objects elsewhere")
        target = _objects_path(inp)
        if target.exists() and not overwrite:
            raise OutputExistsError(f"{str(inp.group_path)!r} already has objects ({target.name} in labels/); "
                                    "pass overwrite=True (CLI: --overwrite) to label them again")
        return "group"
    return None


def _labels_group(inp: _Input) -> None:
    """Create ``labels/`` in the image group, in its NGFF version, and list ``objects`` in it."""
    import zarr

    zarr_format = 3 if inp.ngff == "0.5" else 2
    root = zarr.open_group(inp.group_path / "labels", mode="a", zarr_format=zarr_format)
    ome = _ome(root)
    names = list(ome.get("labels", []))
    if "objects" not in names:
        names.append("objects")
    version = {"version": "0.5"} if inp.ngff == "0.5" else {}
    _set_ome(root, {**version, **ome, "labels": names})


def _sink(inp: _Input, where: Any, dtype, overwrite: bool, writers: int):
    from .io.sinks import ZarrSink

    target = _objects_path(inp) if where == "group" else where
    if where == "group":
        _labels_group(inp)
    chunks = tuple(e[1] - e[0] for e in inp.grid.edges)[3 - inp.ndim:]
    names = ("y", "x") if inp.ndim == 2 else ("z", "y", "x")
    # In labels/ of a segment output the objects are an NGFF label image of it; written
    # elsewhere, a plain image (an image-label root is read as the label of an image two
    # folders up, which napari-ome-zarr then creates).
    inside = where == "group"
    return ZarrSink(target, inp.shape, dtype, chunks, overwrite=overwrite, pixel_size=inp.pixel_size,
                    writers=writers, labels=1 if inside else None, label_image=inside, dimension_names=names,
                    ngff=inp.ngff if inside else "0.5")


def _finish_sink(sink: Any, where: Any) -> Any:
    """Close the sink (pyramid, NGFF metadata); point the label image at its image."""
    import zarr

    array = sink.close()  # opened read-only
    if where == "group":
        group = zarr.open_group(array.store.with_read_only(False), mode="r+")
        ome = _ome(group)
        _set_ome(group, {**ome, "image-label": {**ome.get("image-label", {}), "source": {"image": "../../"}}})
    return array


# ----------------------------------------------------------------------------- the objects


class Objects:
    """The objects of a label map: instance labels, a table, and exports.

    Attributes
    ----------
    labels : numpy.ndarray or zarr.Array
        Object ids, 0 background, 1..N (uint32; uint64 beyond 2**32 - 1 objects).
    table : pandas.DataFrame
        One row per object, ordered by id: ``id``, ``class``, ``class_name``,
        ``area`` (pixels or voxels) and ``area_um2`` (2-D; ``volume_um3`` in 3-D)
        when the pixel size is known, ``centroid_[z]y/x`` and the box
        ``bbox_[z0]y0/x0/[z1]y1/x1`` (end exclusive) in full-resolution pixels,
        and ``mean_probability`` of the object's class when the map came with
        probabilities.
    class_names, class_colours : dict
        Name and RGB colour per class value (from the segment output's metadata).
    pixel_size : tuple of float or None
        Micrometres per pixel along the spatial axes.
    """

    def __init__(self, labels: Any, merged: Merged, inp: _Input) -> None:
        self.labels = labels
        self.ndim = inp.ndim
        self.pixel_size = inp.pixel_size
        self._grid = inp.grid
        self._merged = merged
        present = sorted({int(k) for k in merged.classes})
        names = {k: inp.names.get(k, f"class {k}") for k in present}
        self.class_names = {**inp.names, **names}
        from .io.sinks import palette

        default = palette(max(present, default=0) + 1)
        self.class_colours = {k: inp.colours.get(k, tuple(default[k][:3])) for k in present}
        self.table = self._table()

    def __len__(self) -> int:
        return self._merged.n_objects

    def __repr__(self) -> str:
        return f"Objects({len(self)} objects, labels {tuple(self.labels.shape)} {self.labels.dtype})"

    def _table(self):
        import pandas as pd

        m, d = self._merged, self.ndim
        axes = "zyx"[3 - d:]
        cols: dict[str, Any] = {
            "id": np.arange(1, m.n_objects + 1, dtype=np.int64),
            "class": m.classes,
            "class_name": pd.Categorical([self.class_names.get(int(k), f"class {k}") for k in m.classes]),
            "area": m.area,
        }
        if self.pixel_size is not None:
            unit = float(np.prod(self.pixel_size))
            cols["area_um2" if d == 2 else "volume_um3"] = m.area * unit
        for i, a in enumerate(axes):
            cols[f"centroid_{a}"] = m.centroid[:, 3 - d + i]
        for i, a in enumerate(axes):
            cols[f"bbox_{a}0"] = m.lo[:, 3 - d + i]
        for i, a in enumerate(axes):
            cols[f"bbox_{a}1"] = m.hi[:, 3 - d + i]
        if m.mean_probability is not None:
            cols["mean_probability"] = m.mean_probability
        return pd.DataFrame(cols)

    def to_table(self, path: Union[str, os.PathLike], overwrite: bool = False) -> Path:
        """Write the table as CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``, needs pyarrow)."""
        path = _new_file(path, overwrite)
        name = path.name.lower()
        if name.endswith(".parquet"):
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise UsageError("Parquet needs pyarrow: pip install pyarrow, or write .csv") from None
            self.table.to_parquet(path, index=False)
        elif name.endswith((".csv", ".csv.gz", ".tsv")):
            self.table.to_csv(path, index=False, sep="\t" if name.endswith(".tsv") else ",")
        else:
            raise UsageError(f"table {str(path)!r}: use a .csv, .csv.gz, .tsv or .parquet name")
        return path

    def outlines(self) -> Iterator[tuple[int, Any]]:
        """Yield ``(id, shapely geometry)`` per object (2-D), chunk by chunk.

        The outline follows pixel edges in full-resolution pixel coordinates
        (x = column, y = row), holes included; its area is the pixel count.
        An object joined only diagonally (connectivity 2) is a MultiPolygon.
        """
        from ._polygons import iter_outlines

        if self.ndim != 2:
            raise UsageError("outlines and GeoJSON are for 2-D maps; a 3-D map has labels and a table only")
        yield from iter_outlines(self.labels, self._grid, self._merged.hi[:, 1:])

    def to_geojson(
        self,
        path: Union[str, os.PathLike],
        *,
        overwrite: bool = False,
        annotation_classes: Sequence[int] = (),
        annotation_min_area: Optional[int] = 100_000,
        scale: float = 1.0,
        progress: bool = False,
    ) -> Path:
        """Write a QuPath-ready GeoJSON FeatureCollection (gzipped when `path` ends in ``.gz``).

        One feature per object: its outline (holes kept, also across chunks)
        in full-resolution pixel coordinates; ``properties.objectType``
        ``"detection"``, or ``"annotation"`` for classes in
        `annotation_classes` and objects of at least `annotation_min_area`
        pixels (None: never by size); ``properties.classification``
        ``{name, color}`` from the model's classes; ``properties.measurements``
        from the table. Features are streamed to the file as their objects
        are complete. `scale` multiplies the coordinates (the downsample of
        the segmented level, when that was not full resolution).
        """
        import gzip

        path = _new_file(path, overwrite)
        if self.ndim != 2:
            raise UsageError("GeoJSON is for 2-D maps; a 3-D map has labels and a table only")
        import shapely

        rows = self.table
        measure = [c for c in rows.columns if c not in ("id", "class", "class_name")]
        values = rows[measure].to_numpy(np.float64)
        annotate = {int(k) for k in annotation_classes}
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        tmp = path.with_name(f".{path.name}.tmp")
        bar = TqdmReporter(progress, unit="object")
        bar.start(len(self), "objects: GeoJSON")
        try:
            with opener(tmp, "wt", encoding="utf-8") as out:
                out.write('{"type": "FeatureCollection", "features": [\n')
                for n, (oid, geometry) in enumerate(self.outlines()):
                    if scale != 1.0:
                        geometry = shapely.transform(geometry, lambda xy: xy * scale)
                    k = int(self._merged.classes[oid - 1])
                    area = int(self._merged.area[oid - 1])
                    big = annotation_min_area is not None and area >= annotation_min_area
                    props = {
                        "objectType": "annotation" if k in annotate or big else "detection",
                        "name": f"{self.class_names.get(k, k)} {oid}",
                        "classification": {"name": self.class_names.get(k, f"class {k}"),
                                           "color": list(self.class_colours.get(k, (255, 0, 0)))},
                        "measurements": {"Object ID": oid, **{c: _number(v) for c, v in zip(measure, values[oid - 1])}},
                    }
                    out.write(("" if n == 0 else ",\n") + '{"type": "Feature", "geometry": '
                              + shapely.to_geojson(geometry) + ', "properties": ' + json.dumps(props) + "}")
                    bar.advance(1)
                out.write("\n]}\n")
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # no half-written file left beside the output
            raise
        finally:
            bar.close()
        return path


def _number(v: float):
    return int(v) if float(v).is_integer() else round(float(v), 4)


def _new_file(path: Union[str, os.PathLike], overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{str(path)!r} exists; pass overwrite=True (CLI: --overwrite) or another path")
    if not path.parent.exists():
        raise UsageError(f"folder {str(path.parent)!r} does not exist; create it first")
    return path


# ----------------------------------------------------------------------------- the function


def label_objects(
    labels: Any,
    output: Union[None, str, os.PathLike, Any] = None,
    *,
    classes: Optional[Sequence[int]] = None,
    connectivity: int = 1,
    probabilities: Any = None,
    class_names: Union[None, Sequence[str], dict] = None,
    chunks: Union[None, int, Sequence[int]] = None,
    overwrite: bool = False,
    progress: Union[bool, Callable[[int, int], Any], Reporter] = True,
    client: Any = None,
    cancel: Cancel = None,
) -> Objects:
    """Find whole objects in a label map: connected components per class, across chunks.

    Parameters
    ----------
    labels : path, zarr group or array, numpy or dask array
        The OME-Zarr written by `segment` (labels; or probabilities/logits,
        read as their argmax), or any 2-D (Y, X) or 3-D (Z, Y, X) integer map.
    output : None, path or zarr store
        Where the instance labels go. None: into a `segment` output as the
        NGFF label image ``labels/objects`` (pyramid and image-label metadata,
        so napari shows it over the image); for arrays, into memory (numpy).
    classes : sequence of int, optional
        Classes whose components are objects (default: every class except 0).
        Components of different classes are always different objects.
    connectivity : int
        1 (face neighbours, as ``scipy.ndimage.label``) up to the number of
        axes (all neighbours, diagonals included).
    probabilities : path or array, optional
        (C, Y, X) class probabilities of the same run, for a labels map: adds
        the mean probability of each object's class to the table.
    class_names : sequence or dict, optional
        Name per class value, for the table and the GeoJSON classification
        (default: those recorded in the segment output by the CLI and
        `write_class_names`, else "class K").
    chunks : int or tuple, optional
        Processing chunk edge (default: the stored chunks, joined up to about
        a megapixel; 1024 for numpy maps).
    overwrite : bool
        Replace existing instance labels.
    progress : bool, callable or Reporter
        As in `segment`: a bar, none, a callable ``(done, total)`` counting
        chunk steps (each chunk is labelled, then written: 2 per chunk), or a
        `tilesegment.report.Reporter`.
    client : dask.distributed.Client, optional
        Label chunks as tasks on this cluster (the map and the output must be
        zarr paths all workers reach). The result equals a local run's.
    cancel : threading.Event or callable, optional
        As in `segment`: stops the pass between chunks while they are
        labelled, with `Cancelled`; nothing is written then, and the segment
        output is left as it was. Writing, the second half, is not cancelled
        once begun.

    Returns
    -------
    Objects
        ``.labels`` (ids 1..N in raster order of each object's first pixel,
        0 background), ``.table``, ``.to_geojson()``, ``.to_table()``.

    Raises
    ------
    InputError
        Not a labels image (float or RGB data, wrong number of axes).
    UsageError
        A class out of range, a bad connectivity.
    OutputExistsError
        Instance labels already there, without `overwrite`.

    Examples
    --------
    >>> import numpy as np, tilesegment as ts
    >>> objs = ts.label_objects(np.array([[1, 1, 0, 2], [0, 0, 0, 2], [1, 0, 1, 1]]), progress=False)
    >>> objs.labels
    array([[1, 1, 0, 2],
           [0, 0, 0, 2],
           [3, 0, 4, 4]], dtype=uint32)
    >>> objs.table[["id", "class", "area"]].values.tolist()
    [[1, 1, 2], [2, 2, 2], [3, 1, 1], [4, 1, 2]]
    """
    inp = _open_input(labels, chunks, probabilities)
    if class_names is not None:
        names = class_names if isinstance(class_names, dict) else dict(enumerate(class_names))
        inp.names = {**inp.names, **{int(k): str(v) for k, v in names.items()}}
    if not isinstance(connectivity, (int, np.integer)) or not 1 <= connectivity <= inp.ndim:
        raise UsageError(f"connectivity {connectivity!r} must be 1 (face neighbours) to {inp.ndim} "
                         f"(all neighbours) for a {inp.ndim}-D map")
    wanted = _check_classes(inp, classes)
    where = _check_outputs(inp, output, overwrite)
    if client is not None and where is None:
        raise UsageError("a distributed run writes the instance labels to a zarr path the workers share; "
                         "pass a segment output or output=PATH")
    task = _Task(inp, wanted, int(connectivity))
    workers = max(1, min(4, os.cpu_count() or 1))
    reporter = as_reporter(progress, cancel, unit="chunk")
    reporter.start(2 * inp.grid.n_chunks, "objects")  # label every chunk, then write it
    try:
        return _label_and_write(task, inp, where, overwrite, client, reporter, workers)
    finally:
        reporter.close()


def _label_and_write(task: _Task, inp: _Input, where: Any, overwrite: bool, client: Any, reporter: Reporter,
                     workers: int) -> "Objects":
    if client is not None:
        merged = _measure_cluster(task, client, reporter, group=max(1, inp.grid.n_chunks // (8 * _n_workers(client))))
    else:
        merged = _measure_local(task, reporter, workers)
    # Writing is not cancelled once begun: half an objects output (and its entry in
    # labels/) would be worse than the seconds it takes to finish.
    dtype = merged.lookups[0].dtype if merged.lookups else np.uint32
    if where is None:
        result = np.zeros(inp.shape, dtype)
        with ThreadPoolExecutor(workers) as pool:
            def fill(i):
                result[inp.grid.region(i)[3 - inp.ndim:]] = task.instances(i, merged.lookups[i])
            for _ in pool.map(fill, range(inp.grid.n_chunks)):
                reporter.advance(1)
        return Objects(result, merged, inp)
    sink = _sink(inp, where, dtype, overwrite, workers)
    try:
        if client is not None:
            _write_cluster(task, client, merged, sink, reporter)
        else:
            for i in range(inp.grid.n_chunks):
                region = inp.grid.region(i)[3 - inp.ndim:]
                sink.commit(region, task.instances(i, merged.lookups[i]))
                reporter.advance(1)
    except BaseException:
        sink.abort()
        raise
    return Objects(_finish_sink(sink, where), merged, inp)


def _n_workers(client: Any) -> int:
    return max(1, len(client.scheduler_info().get("workers", {})))


def _write_cluster(task: _Task, client: Any, merged: Merged, sink: Any, reporter: Reporter) -> None:
    from distributed import as_completed

    sink.keep = True  # other processes write into it
    spec = client.scatter(task, broadcast=True, hash=False)
    array_path = os.fspath(sink.path / "0")
    groups = _groups(task.input.grid.n_chunks, max(1, task.input.grid.n_chunks // (8 * _n_workers(client))))
    futures = [client.submit(_write_many, spec, g, [merged.lookups[i] for i in g], array_path, pure=False)
               for g in groups]
    try:
        for future in as_completed(futures):
            reporter.advance(future.result())
    except BaseException:
        client.cancel(futures)
        raise


def write_class_names(output: Union[str, os.PathLike], names: Sequence[str]) -> None:
    """Record class names in a segment output (``tilesegment.classes``, and the
    ``image-label`` properties of label images that have them).

    `label_objects` reads them back for the table and the GeoJSON classification.
    """
    import zarr

    group = zarr.open_group(output, mode="r+")
    names = [str(name) for name in names]
    group.attrs["tilesegment"] = {**dict(group.attrs.get("tilesegment", {})), "classes": names}
    ome = _ome(group)
    if "image-label" in ome:
        label = dict(ome["image-label"])
        label["properties"] = [{"label-value": k, "class": name} for k, name in enumerate(names)]
        _set_ome(group, {**ome, "image-label": label})
