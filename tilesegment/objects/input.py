"""The label map `label_objects` reads: a segment output, a zarr, dask or numpy array, chunk by chunk.

Whatever the input, the passes see an `Input`: the map's array, the
`tilesegment.modes.Mode` it was written in, its chunk `Grid`, and what its
metadata says (pixel size, class names and colours, the number of classes).
A map of one value per pixel (``labels``) is read as it is; a map of one
channel per class (``probabilities``, ``logits``, or any mode whose
``per_class`` is set) is read as its argmax, with the confidence of the
winning class: the value scaled by its dtype's range for integer maps
(quantized probabilities), the softmax of the top value for float maps
(logits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .._components import Grid
from ..errors import InputError, UsageError
from ..io.ngff import ngff_version, read_ome
from ..modes import Mode, get_mode
from ..registry import modes

__all__ = ["Input", "open_input", "check_classes", "DEFAULT_CHUNK"]

#: Edge of the chunks an in-memory map is processed in (2-D; 3-D maps use 128).
DEFAULT_CHUNK = 1024
#: Pixels per processing chunk aimed at when a zarr map is stored in smaller chunks.
_TARGET_PIXELS = 1 << 20


@dataclass
class Input:
    """A label map (or a per-class map read as its argmax), chunk by chunk.

    Plain and picklable: distributed tasks receive it and read their chunks.
    """

    array: Any  # spatial axes last; the class axis first when the mode is per class
    mode: Mode  # what the segment run wrote (labels for maps of other origin)
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
    recipe: Optional[dict] = None  # the instance recipe the segment run recorded (InstanceRecipe.to_dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[-self.ndim:])

    @property
    def has_probability(self) -> bool:
        return self.mode.per_class or self.probabilities is not None

    def read(self, flat: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Chunk `flat` as 3-D arrays: the labels, and the probability of each pixel's class."""
        return self.read_region(self.grid.region(flat)[3 - self.ndim:])

    def read_region(self, spatial: tuple[slice, ...]) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """As `read`, for any region (slices of the spatial axes)."""
        block = np.asarray(self.array[(..., *spatial)])
        if self.mode.per_class:
            labels = np.argmax(block, axis=0).astype(np.uint16 if block.shape[0] > 255 else np.uint8)
            top = block.max(axis=0)
            if block.dtype.kind in "ui":
                prob = _scaled(top)
            else:  # logits: the softmax of the top one
                prob = 1.0 / np.exp(block.astype(np.float32) - top[None].astype(np.float32)).sum(axis=0)
        else:
            labels = block
            prob = None
            if self.probabilities is not None:
                probs = np.asarray(self.probabilities[(..., *spatial)])
                if labels.size and int(labels.max()) >= probs.shape[0]:
                    raise InputError(f"the labels hold class {int(labels.max())} but the probabilities have "
                                     f"only {probs.shape[0]} channels; pass the probabilities of the same run")
                prob = _scaled(np.take_along_axis(probs, labels[None].astype(np.intp), 0)[0])
        shape3 = (1,) * (3 - self.ndim) + labels.shape
        return labels.reshape(shape3), None if prob is None else prob.reshape(shape3)

    def classes_in(self, labels: np.ndarray) -> list[int]:
        """The non-zero values of a chunk (the classes when none were named)."""
        if labels.dtype.itemsize <= 2 and labels.dtype.kind == "u":
            return [int(v) for v in np.flatnonzero(np.bincount(labels.ravel())) if v]
        return [int(v) for v in np.unique(labels) if v]


def _scaled(values: np.ndarray) -> np.ndarray:
    """Probabilities as float32: integers scaled by their dtype's range (uint8 255 is 1.0)."""
    scale = float(np.iinfo(values.dtype).max) if values.dtype.kind in "ui" else 1.0
    return values.astype(np.float32) / scale


def open_input(labels: Any, chunks: Any, probabilities: Any) -> Input:
    """The `Input` for `label_objects`' `labels` (path, zarr group or array, numpy or dask array)."""
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
    return _open_array(labels, chunks, probabilities, get_mode("labels"), name="the array")


def _segment_mode(record: dict, where: str) -> Mode:
    """The mode a segment run recorded; labels for maps without a record (other writers)."""
    name = record.get("mode", "labels")
    if name not in modes:
        raise InputError(f"{where!r} was written in mode {name!r}, which no installed package provides; "
                         f"install the package that registers it (known modes: {', '.join(modes.names())})")
    mode = get_mode(name)
    if not mode.per_class and mode.label_count(2) is None:
        raise InputError(f"{where!r} holds {name!r}, which is neither class labels nor per-class values; "
                         "pass a labels, probabilities or logits output of segment")
    return mode


def _open_group(group: Any, path: Optional[Path], chunks: Any, probabilities: Any) -> Input:
    where = str(path) if path is not None else "the zarr group"
    ome = read_ome(group)
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
    record = dict(group.attrs.get("tilesegment", {}))
    mode = _segment_mode(record, where)
    if channel and not mode.per_class:
        raise InputError(f"{where!r} is not a labels image: it has a channel axis and no probabilities "
                         "or logits of a segment run; pass the labels output of segment")
    inp = _open_array(group[full], chunks, probabilities, mode, name=repr(where))
    inp.group_path = path
    inp.ours = "tilesegment" in group.attrs
    inp.ngff = ngff_version(group)
    inp.pixel_size = _pixel_size(multiscales[0], inp.ndim)
    label_meta = ome.get("image-label", {})
    colours = {int(c["label-value"]): tuple(int(v) for v in c["rgba"][:3])
               for c in label_meta.get("colors", []) if "label-value" in c}
    names = dict(enumerate(record.get("classes", [])))
    names.update({int(p["label-value"]): str(p.get("class", p.get("name")))
                  for p in label_meta.get("properties", []) if "label-value" in p})
    if mode.per_class:
        inp.num_classes = int(group[full].shape[0])
    elif colours:  # a label image (its colours list every value)
        inp.num_classes = max(colours) + 1
    elif "label_values" in record:  # a class map written by segment
        inp.num_classes = int(record["label_values"])
    inp.names, inp.colours = names, colours
    inp.recipe = record.get("instances")
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


def _open_array(array: Any, chunks: Any, probabilities: Any, mode: Mode, name: str) -> Input:
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        array = np.asarray(array)
    ndim = len(array.shape) - int(mode.per_class)
    dtype = np.dtype(array.dtype)
    if not mode.per_class and dtype.kind not in "uib":
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
        if mode.per_class:
            raise UsageError("probabilities= is for a labels map; this input already holds probabilities")
        probs = _open_probabilities(probabilities)
        if tuple(probs.shape[1:]) != tuple(array.shape):
            raise InputError(f"probabilities of shape {tuple(probs.shape)} do not match the labels "
                             f"{tuple(array.shape)}; expected (classes, {', '.join(map(str, array.shape))})")
    return Input(array, mode, ndim, grid, probabilities=probs)


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


def check_classes(inp: Input, classes: Optional[Sequence[int]]) -> Optional[tuple[int, ...]]:
    """The classes whose components are objects: `classes` checked against the map, or all but 0
    (None when the map does not say how many it has: each chunk's own values then)."""
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
