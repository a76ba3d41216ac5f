"""Check an OME-Zarr output: finished, every chunk there and readable, metadata that holds together.

`verify_output` reads what a run left and lists its problems, one line each,
without changing anything. It checks, in this order:

- the run: no manifest of an unfinished run (``.tilesegment/run.json``), the
  completion record in the group's ``tilesegment`` attributes, no temporaries
  of a killed write (``*.partial``);
- the OME metadata of the image and of each label image in ``labels/``: a
  ``multiscales`` entry whose axes are named once each, and whose datasets
  exist as arrays with one scale per axis and the arrays' number of axes;
- the pyramid: one dtype, each level no larger than the one above it and
  the size its scale says (the level above divided by the scale ratio,
  rounded up);
- every chunk of every array: its file is present (outputs write every
  chunk, background included) and decodes;
- label images: listed in ``labels/``, present, and the shape of the image's
  spatial axes.

It reads one chunk at a time: memory stays at a chunk whatever the output's size.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..errors import InputError
from .ngff import ngff_version, read_ome

__all__ = ["Verified", "verify_output"]


@dataclass
class Verified:
    """What `verify_output` found: `problems` (one line each; empty when all is well) and counts."""

    path: Path
    problems: list[str] = field(default_factory=list)
    arrays: int = 0
    chunks: int = 0
    ngff: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: what was checked."""
        return (f"{self.path}: {self.arrays} arrays, {self.chunks} chunks present and readable, "
                f"NGFF {self.ngff} metadata consistent, run complete")


def verify_output(path: Union[str, Path]) -> Verified:
    """Check the OME-Zarr output at `path` (a local folder); see the module docstring.

    Raises
    ------
    InputError
        `path` does not exist.
    """
    import zarr

    path = Path(path)
    if not path.exists():
        raise InputError(f"{str(path)!r} does not exist; pass the OME-Zarr folder a segment run wrote")
    found = Verified(path)
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as exc:
        found.problems.append(f"{path}: not a zarr group ({_first_line(exc)})")
        return found
    found.ngff = ngff_version(group)
    _check_run(path, group, found)
    image, names = _check_image(path, group, "", found)
    if "labels" in group:
        _check_labels(path, group["labels"], _spatial_shape(image, names), found)
    return found


def _check_run(path: Path, group: Any, found: Verified) -> None:
    run = path / ".tilesegment" / "run.json"
    if run.is_file():
        done = path / ".tilesegment" / "done"
        blocks = sum(1 for p in done.iterdir() if p.name.isdigit()) if done.is_dir() else 0
        found.problems.append(f"{path}: a run stopped before it finished ({blocks} blocks recorded in "
                              ".tilesegment/); continue it with the same segment command and --resume")
    elif not group.attrs.get("tilesegment", {}).get("complete"):
        found.problems.append(f"{path}: no completion record (attributes tilesegment.complete); not a finished "
                              "tilesegment output")
    for partial in sorted(path.rglob("*.partial")):
        found.problems.append(f"{partial.relative_to(path.parent)}: temporary of a write that was killed")


def _check_image(path: Path, group: Any, where: str, found: Verified) -> tuple[list, list]:
    """Check one multiscales image; return its level arrays (None for missing ones) and axis names."""
    name = f"{path}/{where}" if where else str(path)
    multiscales = read_ome(group).get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        found.problems.append(f"{name}: no OME multiscales metadata")
        return [], []
    ms = multiscales[0]
    axes = ms.get("axes")
    names = [a.get("name") for a in axes] if isinstance(axes, list) and all(isinstance(a, dict) for a in axes) else None
    if not names or len(set(names)) != len(names):
        found.problems.append(f"{name}: multiscales axes {axes!r} are not a list of distinct named axes")
        return [], []
    datasets = ms.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        found.problems.append(f"{name}: multiscales lists no datasets")
        return [], names
    levels, scales = [], []
    for dataset in datasets:
        level = dataset.get("path") if isinstance(dataset, dict) else None
        scale = _scale(dataset)
        label = f"{name}/{level}"
        array = group.get(str(level)) if level is not None else None
        if array is None or not hasattr(array, "shape"):
            found.problems.append(f"{label}: pyramid level listed in the metadata is missing")
            levels.append(None), scales.append(None)
            continue
        if scale is None or len(scale) != len(names):
            found.problems.append(f"{label}: scale {scale!r} does not have one value per axis ({len(names)})")
            scale = None
        if array.ndim != len(names):
            found.problems.append(f"{label}: {array.ndim} axes, the metadata names {len(names)}")
        levels.append(array), scales.append(scale)
        _check_chunks(label, array, found)
    _check_pyramid(name, levels, scales, datasets, found)
    return levels, names


def _scale(dataset: Any):
    if not isinstance(dataset, dict):
        return None
    for transform in dataset.get("coordinateTransformations") or []:
        if isinstance(transform, dict) and transform.get("type") == "scale":
            return transform.get("scale")
    return None


def _check_pyramid(name: str, levels: list, scales: list, datasets: list, found: Verified) -> None:
    pairs = [(d.get("path"), a, s) for d, a, s in zip(datasets, levels, scales) if a is not None]
    for (p0, upper, s0), (p1, lower, s1) in zip(pairs, pairs[1:]):
        if lower.dtype != upper.dtype:
            found.problems.append(f"{name}/{p1}: dtype {lower.dtype}, level {p0} has {upper.dtype}")
        if lower.ndim != upper.ndim:
            continue  # already reported against the axes
        if s0 is not None and s1 is not None and all(isinstance(v, (int, float)) and v > 0 for v in s0 + s1):
            want = tuple(math.ceil(n / round(b / a)) for n, a, b in zip(upper.shape, s0, s1))
            if tuple(lower.shape) != want:
                found.problems.append(f"{name}/{p1}: shape {tuple(lower.shape)}, its scale says {want} "
                                      f"(level {p0} is {tuple(upper.shape)})")
        elif any(m > n for m, n in zip(lower.shape, upper.shape)):
            found.problems.append(f"{name}/{p1}: shape {tuple(lower.shape)} larger than level {p0}'s "
                                  f"{tuple(upper.shape)}")


def _check_chunks(label: str, array: Any, found: Verified) -> None:
    """Every chunk of `array` present as a file and decodable, one at a time."""
    found.arrays += 1
    folder = Path(str(array.store.root)) / array.path if hasattr(array.store, "root") else None
    grid = [range(math.ceil(n / c)) for n, c in zip(array.shape, array.chunks)]
    for coords in itertools.product(*grid):
        key = array.metadata.encode_chunk_key(coords)
        if folder is not None and not (folder / key).is_file():
            found.problems.append(f"{label}: chunk {key} is missing")
            continue
        region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, array.chunks, array.shape))
        try:
            np.asarray(array[region])
        except Exception as exc:
            found.problems.append(f"{label}: chunk {key} cannot be decoded ({_first_line(exc)})")
            continue
        found.chunks += 1


def _check_labels(path: Path, labels: Any, spatial: Any, found: Verified) -> None:
    """Each label image listed in ``labels/``: present, a valid image, of the image's spatial shape."""
    listed = read_ome(labels).get("labels")
    if not isinstance(listed, list):
        found.problems.append(f"{path}/labels: no OME labels list")
        return
    for name in listed:
        where = f"labels/{name}"
        if name not in labels:
            found.problems.append(f"{path}/{where}: listed in labels/ but missing")
            continue
        levels, _ = _check_image(path, labels[name], where, found)
        if levels and levels[0] is not None and spatial is not None and tuple(levels[0].shape) != spatial:
            found.problems.append(f"{path}/{where}: shape {tuple(levels[0].shape)}, its image is {spatial}")


def _spatial_shape(image: list, names: list):
    """The image's full-resolution shape over its spatial axes (None when unknown)."""
    if not image or image[0] is None or len(names) != image[0].ndim:
        return None
    return tuple(n for n, a in zip(image[0].shape, names) if a not in ("c", "t"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
