"""Zarr arrays and OME-Zarr images (NGFF 0.4 on zarr v2, 0.5 on zarr v3), local or remote.

A local folder is a zarr store when it holds zarr metadata (``zarr.json``,
``.zgroup`` or ``.zarray``); a URL when its path ends in ``.zarr`` or ``/``.
An OME-Zarr group's ``multiscales`` datasets are the pyramid levels, with
their axes and pixel sizes; a plain array is one level.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from ...errors import InputError, TileSegmentError, cause
from ...registry import readers
from ..ngff import read_ome
from ..remote import filesystem_options, is_url, url_name
from ..sources import Backend, ImageSource, Level, check_level, default_axes

__all__ = ["ZarrReader"]

#: Files at the root of a zarr v3 node, a zarr v2 group and a zarr v2 array.
_METADATA = ("zarr.json", ".zgroup", ".zarray")


class ZarrReader:
    """Zarr arrays and OME-Zarr groups, from a folder or a URL."""

    name = "zarr"
    priority = 20
    formats = "OME-Zarr, zarr arrays"

    def can_open(self, target: Any) -> bool:
        """Whether `target` is a folder with zarr metadata, or a URL ending in ``.zarr`` or ``/``."""
        if is_url(target):
            return url_name(target).lower().endswith(".zarr") or target.split("?", 1)[0].endswith("/")
        if not isinstance(target, (str, os.PathLike)):
            return False
        try:
            path = Path(target)
            return path.is_dir() and any((path / name).is_file() for name in _METADATA)
        except (OSError, ValueError):  # unreadable, a NUL in the name
            return False

    def open(self, target: Any, *, axes: Optional[str], level: int, series: int,
             storage_options: Optional[dict], ndim: int) -> ImageSource:
        """Open the zarr array, or level `level` of the OME-Zarr image, at `target`."""
        import zarr

        remote = is_url(target)
        name = url_name(target) if remote else Path(target).name
        # zarr takes storage_options only with URLs.
        options = {"storage_options": filesystem_options(storage_options)} if remote else {}
        try:
            node = zarr.open(str(target), mode="r", **options)
        except Exception as exc:
            raise _damaged(target, remote, exc, f"input {str(target)!r} is not a zarr store") from None
        try:
            if not isinstance(node, zarr.Group):
                check_level(level, 1, name)
                return ImageSource(node, axes or default_axes(tuple(node.shape), ndim), name=name, format="zarr")
            return _open_multiscales(node, str(target), name, axes, level, ndim)
        except TileSegmentError:
            raise
        except Exception as exc:  # zarr reads the arrays' metadata only now
            raise _damaged(target, remote, exc, f"cannot read {str(target)!r}") from None


def _damaged(target: Any, remote: bool, exc: Exception, what: str) -> InputError:
    """The error for a store whose metadata zarr cannot read, naming the broken document when
    it is a local file that is not JSON (zarr's own message does not say which)."""
    if not remote:
        broken = _broken_metadata(Path(target))
        if broken is not None:
            path, problem = broken
            return InputError(f"{what}: its metadata {str(path)!r} is damaged ({problem}); "
                              "restore the file or write the store again")
    return InputError(f"{what}: its zarr metadata is damaged or unsupported ({cause(exc)})")


def _broken_metadata(root: Path) -> Optional[tuple[Path, str]]:
    """The first zarr metadata document under `root` that is not a JSON object, and why."""
    for path in sorted(root.rglob("*")):
        if path.name not in (*_METADATA, ".zattrs") or not path.is_file():
            continue
        try:
            document = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            return path, cause(exc)
        except OSError as exc:
            return path, cause(exc)
        if not isinstance(document, dict):
            return path, f"a JSON {type(document).__name__}, not an object"
    return None


def _open_multiscales(node: Any, path: str, name: str, axes: Optional[str], level: int,
                      ndim: int) -> ImageSource:
    """Level `level` of the OME-Zarr image group `node`, with its pyramid, axes and pixel sizes."""
    multiscales = read_ome(node).get("multiscales")
    if not multiscales:
        raise InputError(
            f"zarr group {path!r} has no OME multiscales; pass the array path inside it"
        )
    ms = multiscales[0]
    datasets = ms.get("datasets") if isinstance(ms, dict) else None
    if not isinstance(datasets, list) or not datasets or not all(
            isinstance(ds, dict) and isinstance(ds.get("path"), str) for ds in datasets):
        raise InputError(f"the OME multiscales of {path!r} are malformed: they need a list of datasets, "
                         "each with a path; write the metadata again (NGFF 0.4 or 0.5)")
    check_level(level, len(datasets), name)
    raw_axes = ms.get("axes", [])
    names = [a.get("name") if isinstance(a, dict) else a for a in raw_axes] if isinstance(raw_axes, list) else None
    if names is None or not all(isinstance(n, str) and n for n in names):
        raise InputError(f"the OME axes of {path!r} are malformed ({raw_axes!r}): each needs a name such "
                         "as 'c', 'y' or 'x'; pass axes= (CLI: --axes) to name them")
    if axes is None and names:
        axes = "".join({"c": "C"}.get(n.lower(), n.upper()) for n in names)
    arrays = [_dataset(node, ds["path"], path) for ds in datasets]
    chosen = arrays[level]
    axes = axes or default_axes(tuple(chosen.shape), ndim)
    plan = ImageSource(chosen, axes, name=name).plan_axes
    levels = []
    for ds, array in zip(datasets, arrays):
        if len(array.shape) != len(axes):
            raise InputError(f"dataset {ds['path']!r} of {path!r} has {len(array.shape)} axes, the image "
                             f"{len(axes)} ({axes}); the pyramid's levels must share their axes")
        levels.append(Level(tuple(int(array.shape[axes.index(a)]) for a in plan),
                            _pixel_size(ds, names, plan)))
    return ImageSource(chosen, axes, levels[level].pixel_size, name=name, format="ome-zarr",
                       levels=tuple(levels), backend=Backend(open_level=lambda i: arrays[i]))


def _dataset(node: Any, key: str, path: str) -> Any:
    """The array at `key` inside the group `node`, or an error that names the dataset."""
    import zarr

    try:
        array = node[key]
    except KeyError as exc:
        if exc.args and exc.args[0] != key:  # a key missing from the array's own metadata
            raise InputError(f"dataset {key!r} of {path!r} cannot be opened: its array metadata is "
                             f"damaged or unsupported (missing {exc.args[0]!r})") from None
        raise InputError(f"dataset {key!r} of the OME multiscales of {path!r} does not exist in the "
                         "store; the metadata or the store is damaged") from None
    if not isinstance(array, zarr.Array):
        raise InputError(f"dataset {key!r} of {path!r} is a group, not an array; the metadata or the "
                         "store is damaged")
    return array


def _pixel_size(dataset: dict, names: list, plan: str) -> Optional[tuple[float, ...]]:
    """The pixel size a dataset's scale transformation gives along the plan axes; None when it
    has none, or one that is not a positive finite number per axis (damaged: unknown)."""
    pixel_size = None
    transforms = dataset.get("coordinateTransformations", [])
    for t in transforms if isinstance(transforms, list) else ():
        scale = t.get("scale") if isinstance(t, dict) and t.get("type") == "scale" else None
        if names and isinstance(scale, list) and len(scale) == len(names):
            try:
                values = [float(v) for v in scale]
            except (TypeError, ValueError):
                return None
            if not all(math.isfinite(v) and v > 0 for v in values):
                return None
            by_name = {n.lower(): v for n, v in zip(names, values)}
            pixel_size = tuple(by_name.get(a.lower(), 1.0) for a in plan)
    return pixel_size


readers.register(ZarrReader.name, ZarrReader())
