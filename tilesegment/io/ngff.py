"""OME-Zarr (NGFF) metadata and pyramid arithmetic.

Most of this module is pure functions that say what to write. Three read and
write a zarr group's OME attributes where its NGFF version keeps them
(`ngff_version`, `read_ome`, `write_ome`): under ``"ome"`` in 0.5 (zarr v3),
at the top of the attributes in 0.4 (zarr v2). Every module that reads or
writes OME metadata goes through them, so the two layouts are told apart in
one place.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["axes_metadata", "storage_order", "pyramid_factors", "multiscales", "downsample", "ngff_version",
           "read_ome", "write_ome"]

#: NGFF axis type of each axis name we write.
_TYPES = {"c": "channel", "t": "time"}


def _sizes(names: Sequence[str], pixel_size: Optional[Sequence[float]]) -> dict[str, float]:
    """Physical size per spatial axis name; 1.0 where unknown. A 2-d pixel size over a
    stack leaves its leading axes at 1.0."""
    spatial = [n for n in names if n not in _TYPES]
    given = [] if pixel_size is None else [float(p) for p in pixel_size][-len(spatial):]
    return dict(zip(spatial, [1.0] * (len(spatial) - len(given)) + given))


def axes_metadata(names: Sequence[str], units: bool = True) -> list[dict]:
    """NGFF ``axes`` for `names` (``"c"``, ``"t"``, ``"z"``, ``"y"``, ``"x"``): space axes in
    micrometres when `units`."""
    axes = []
    for name in names:
        kind = _TYPES.get(name, "space")
        axis = {"name": name, "type": kind}
        if kind == "space" and units:
            axis["unit"] = "micrometer"
        axes.append(axis)
    return axes


def storage_order(names: Sequence[str]) -> tuple[int, ...]:
    """Axis order NGFF requires (time, then channel, then space) as a permutation of `names`.

    >>> storage_order(("c", "t", "y", "x"))
    (1, 0, 2, 3)
    """
    rank = {"t": 0, "c": 1}
    return tuple(sorted(range(len(names)), key=lambda i: (rank.get(names[i], 2), i)))


def pyramid_factors(
    shape: Sequence[int],
    names: Sequence[str],
    pixel_size: Optional[Sequence[float]] = None,
    smallest: Optional[int] = None,
) -> list[tuple[int, ...]]:
    """Per pyramid level below the full resolution, the downsampling factor of each axis.

    Every level halves y and x. A z axis is halved too once it is no coarser
    than 1.5 times the y/x pixel size of the new level, so an anisotropic
    volume (z 2 um, x 0.5 um) keeps its z until y/x catch up and the pyramid
    tends to isotropic voxels; channel and time axes are never downsampled,
    nor an axis already down to one element. Levels are added until y and x
    fit `smallest` (default: 1024 px for images, 256 for volumes, whose
    levels are read whole by 3-d viewers).

    Parameters
    ----------
    shape : sequence of int
        Full-resolution shape, one entry per name.
    names : sequence of str
        Axis names, e.g. ``("c", "z", "y", "x")``.
    pixel_size : sequence of float, optional
        Physical size per spatial axis (the names other than c/t, in order);
        unknown means isotropic.

    Examples
    --------
    >>> pyramid_factors((40, 3000, 3000), "zyx", (2.0, 0.5, 0.5))
    [(1, 2, 2), (1, 4, 4), (2, 8, 8), (4, 16, 16)]
    """
    names = list(names)
    size = [_sizes(names, pixel_size).get(n, 1.0) for n in names]
    y, x = names.index("y"), names.index("x")
    if smallest is None:
        smallest = 256 if "z" in names else 1024
    factors, current = [], [1] * len(names)
    while max(-(-shape[y] // current[y]), -(-shape[x] // current[x])) > smallest:
        new = list(current)
        for axis in (y, x):
            if -(-shape[axis] // current[axis]) > 1:
                new[axis] = current[axis] * 2
        plane = min(size[y] * new[y], size[x] * new[x])
        if "z" in names:
            z = names.index("z")
            if -(-shape[z] // current[z]) > 1 and size[z] * current[z] * 2 <= 1.5 * plane:
                new[z] = current[z] * 2
        factors.append(tuple(new))
        current = new
    return factors


def multiscales(
    names: Sequence[str],
    pixel_size: Optional[Sequence[float]],
    name: str,
    factors: Sequence[Sequence[int]] = (),
    version: str = "0.5",
) -> dict:
    """The OME attributes of an image with levels ``0, 1, ...`` downsampled by `factors`
    (from `pyramid_factors`; the full resolution is not listed).

    `pixel_size` gives one physical size per spatial axis (names other than
    c/t); unknown (None) writes scales of 1 and no units.
    """
    names = list(names)
    base = _sizes(names, pixel_size)
    datasets = []
    for level, factor in enumerate([(1,) * len(names), *factors]):
        scale = [base.get(n, 1.0) * f for n, f in zip(names, factor)]
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    ms = {"name": name, "axes": axes_metadata(names, units=pixel_size is not None), "datasets": datasets}
    if version == "0.4":
        return {"multiscales": [{**ms, "version": "0.4"}]}
    return {"version": "0.5", "multiscales": [ms]}


def downsample(block: np.ndarray, factor: Sequence[int], labels: bool) -> np.ndarray:
    """`block` reduced by `factor` (1 or 2 per axis): labels keep the first element of each
    group (nearest: labels stay labels), other values the mean (rounded for integers),
    with the far edge repeated where a group is incomplete."""
    keep = tuple(slice(None, None, f) for f in factor)
    if labels:
        return block[keep]
    pad = [(0, (-n) % f) for n, f in zip(block.shape, factor)]
    data = np.pad(block.astype(np.float32), pad, mode="edge")
    halved = [a for a, f in enumerate(factor) if f > 1]
    total = None
    # Offsets with the first halved axis fastest: (0, 0), (1, 0), (0, 1), (1, 1) for
    # (y, x), the order the 2-d pyramid has always summed in (same float rounding).
    for offsets in itertools.product((0, 1), repeat=len(halved)):
        index = [slice(None)] * data.ndim
        for a, o in zip(halved, reversed(offsets)):
            index[a] = slice(o, None, 2)
        part = data[tuple(index)]
        total = part if total is None else total + part
    mean = total / float(2 ** len(halved)) if halved else data
    return np.rint(mean).astype(block.dtype) if block.dtype.kind in "ui" else mean.astype(block.dtype)


def ngff_version(group: Any) -> str:
    """The NGFF version of a zarr group: ``"0.5"`` (zarr v3, or attributes under ``"ome"``), else ``"0.4"``."""
    return "0.5" if "ome" in group.attrs or group.metadata.zarr_format == 3 else "0.4"


def read_ome(group: Any) -> dict:
    """The OME metadata of a zarr group, in either NGFF version (empty when it has none)."""
    attrs = group.attrs.asdict()
    return dict(attrs.get("ome", attrs)) if ngff_version(group) == "0.5" else dict(attrs)


def write_ome(group: Any, meta: dict) -> None:
    """Write the OME metadata `meta` where the group's NGFF version keeps it.

    0.5 replaces the ``"ome"`` attribute; 0.4 adds the keys to the top of the
    attributes (next to others such as ``tilesegment``), replacing those it names.
    """
    if ngff_version(group) == "0.5":
        group.attrs["ome"] = meta
    else:
        group.attrs.update(meta)
