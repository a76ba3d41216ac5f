"""Zarr arrays and OME-Zarr images (NGFF 0.4 on zarr v2, 0.5 on zarr v3), local or remote.

A local folder is a zarr store when it holds zarr metadata (``zarr.json``,
``.zgroup`` or ``.zarray``); a URL when its path ends in ``.zarr`` or ``/``.
An OME-Zarr group's ``multiscales`` datasets are the pyramid levels, with
their axes and pixel sizes; a plain array is one level.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from ...errors import InputError
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
            raise InputError(f"input {str(target)!r} is not a zarr store ({exc})") from None
        if not isinstance(node, zarr.Group):
            check_level(level, 1, name)
            return ImageSource(node, axes or default_axes(tuple(node.shape), ndim), name=name, format="zarr")
        return _open_multiscales(node, str(target), name, axes, level, ndim)


def _open_multiscales(node: Any, path: str, name: str, axes: Optional[str], level: int,
                      ndim: int) -> ImageSource:
    """Level `level` of the OME-Zarr image group `node`, with its pyramid, axes and pixel sizes."""
    multiscales = read_ome(node).get("multiscales")
    if not multiscales:
        raise InputError(
            f"zarr group {path!r} has no OME multiscales; pass the array path inside it"
        )
    ms = multiscales[0]
    datasets = ms["datasets"]
    check_level(level, len(datasets), name)
    names = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])]
    if axes is None and names:
        axes = "".join({"c": "C"}.get(n.lower(), n.upper()) for n in names)
    chosen = node[datasets[level]["path"]]
    axes = axes or default_axes(tuple(chosen.shape), ndim)
    plan = ImageSource(chosen, axes, name=name).plan_axes
    levels = []
    for ds in datasets:
        array = node[ds["path"]]
        pixel_size = None
        for t in ds.get("coordinateTransformations", []):
            if t.get("type") == "scale" and names and len(t["scale"]) == len(names):
                by_name = {n.lower(): float(v) for n, v in zip(names, t["scale"])}
                pixel_size = tuple(by_name.get(a.lower(), 1.0) for a in plan)
        levels.append(Level(tuple(int(array.shape[axes.index(a)]) for a in plan), pixel_size))
    return ImageSource(chosen, axes, levels[level].pixel_size, name=name, format="ome-zarr",
                       levels=tuple(levels), backend=Backend(open_level=lambda i: node[datasets[i]["path"]]))


readers.register(ZarrReader.name, ZarrReader())
