"""Open images lazily: TIFF family (tifffile), zarr, numpy and dask arrays."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import InputError

__all__ = ["ImageSource", "open_image", "ImageLike"]

ImageLike = Union[str, os.PathLike, np.ndarray, Any]
_SPATIAL = "YX"
_CHANNEL = "CS"


@dataclass(frozen=True, eq=False)
class ImageSource:
    """A 2-D image with channels, read region by region in its native layout.

    Attributes
    ----------
    array : array-like
        Anything with ``shape``, ``dtype`` and numpy slicing (numpy, zarr,
        dask, tifffile's zarr store).
    axes : str
        One letter per axis of `array`: ``Y``, ``X``, at most one channel axis
        ``C`` or ``S``, and other axes of size 1 (squeezed).
    pixel_size : (float, float) or None
        Physical pixel size ``(y, x)`` in micrometres, when the file says.
    name : str
        What to call the image in messages.
    """

    array: Any
    axes: str
    pixel_size: Optional[tuple[float, float]] = None
    name: str = "image"
    _resources: tuple = field(default=(), repr=False)

    def __post_init__(self) -> None:
        axes = self.axes.upper()
        object.__setattr__(self, "axes", axes)
        shape = tuple(self.array.shape)
        if len(axes) != len(shape):
            raise InputError(
                f"axes {axes!r} do not match the {len(shape)}-d shape {shape} of {self.name}; "
                "pass axes= with one letter per axis, e.g. 'YXS' or 'CYX'"
            )
        if "Y" not in axes or "X" not in axes or sum(a in _CHANNEL for a in axes) > 1:
            raise InputError(
                f"axes {axes!r} of {self.name} need exactly one Y, one X and at most one "
                "channel axis (C or S); pass axes= to say which is which"
            )
        extra = [(a, n) for a, n in zip(axes, shape) if a not in _SPATIAL + _CHANNEL and n != 1]
        if extra:
            raise InputError(
                f"{self.name} has non-spatial axes {extra} larger than 1; "
                "select one plane first (e.g. image[0])"
            )
        if 0 in shape:
            raise InputError(f"{self.name} is empty (shape {shape})")
        dtype = np.dtype(self.array.dtype)
        if dtype.kind not in "uif" and dtype != np.bool_:
            raise InputError(f"{self.name} has dtype {dtype}; expected an integer or float image")

    @property
    def shape(self) -> tuple[int, int]:
        """Spatial shape ``(Y, X)``."""
        s = self.array.shape
        return (int(s[self.axes.index("Y")]), int(s[self.axes.index("X")]))

    @property
    def channels(self) -> int:
        """Number of channels (1 when the image has no channel axis)."""
        for i, a in enumerate(self.axes):
            if a in _CHANNEL:
                return int(self.array.shape[i])
        return 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Return pixels ``[y0:y1, x0:x1]`` as a ``(Y, X, C)`` array (a view where possible)."""
        index, order = [], []
        for axis in self.axes:
            if axis == "Y":
                index.append(slice(y0, y1))
            elif axis == "X":
                index.append(slice(x0, x1))
            elif axis in _CHANNEL:
                index.append(slice(None))
            else:
                index.append(0)
                continue
            order.append(axis)
        region = self.array[tuple(index)]
        if hasattr(region, "compute"):  # dask
            region = region.compute()
        region = np.asarray(region)
        if len(order) == 2:
            region = region[..., None]
            order.append("C")
        perm = [order.index("Y"), order.index("X"), 3 - order.index("Y") - order.index("X")]
        return region.transpose(perm)

    def close(self) -> None:
        """Close files the source holds open."""
        for resource in self._resources:
            resource.close()


def _default_axes(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "YXS" if shape[-1] in (3, 4) else "CYX"
    raise InputError(
        f"cannot tell the axes of a {len(shape)}-d array of shape {shape}; "
        "pass axes=, e.g. 'YX', 'YXS' or 'CYX'"
    )


def open_image(image: ImageLike, axes: Optional[str] = None, level: int = 0) -> ImageSource:
    """Open `image` for region reads without loading it.

    Parameters
    ----------
    image : path, numpy array, zarr array or dask array
        A TIFF-family file (SVS, OME-TIFF, NDPI, generic tiled TIFF), a zarr
        store path, or an array of shape (Y, X), (Y, X, S) with S in {3, 4},
        or (C, Y, X).
    axes : str, optional
        Override the axes, one letter per dimension (``Y``, ``X``, ``C``/``S``).
    level : int
        Pyramid level to read (0 is full resolution).

    Raises
    ------
    InputError
        If the file is missing or not an image, or the axes cannot be told.
    """
    if isinstance(image, ImageSource):
        return image
    if isinstance(image, (str, os.PathLike)):
        return _open_path(Path(image), axes, level)
    if not hasattr(image, "shape") or not hasattr(image, "dtype"):
        try:
            image = np.asarray(image)
        except Exception as exc:
            raise InputError(f"cannot use a {type(image).__name__} as an image: {exc}") from exc
    if level != 0:
        raise InputError(f"level={level} needs a pyramidal file; an array has only level 0")
    shape = tuple(image.shape)
    return ImageSource(image, axes or _default_axes(shape), name=f"array {shape}")


def _open_path(path: Path, axes: Optional[str], level: int) -> ImageSource:
    if not path.exists():
        raise InputError(f"input {str(path)!r} does not exist; check the path")
    if path.is_dir() or path.suffix == ".zarr":
        return _open_zarr(path, axes, level)
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise InputError(
            f"input {str(path)!r} is not a readable TIFF-family image ({exc}); "
            "supported: TIFF, SVS, OME-TIFF, NDPI, zarr"
        ) from None
    try:
        series = tif.series[0]
        if not 0 <= level < len(series.levels):
            raise InputError(
                f"level {level} is out of range for {path.name}: it has "
                f"{len(series.levels)} level(s), 0..{len(series.levels) - 1}"
            )
        import zarr

        store = series.aszarr(level=level)
        array = zarr.open_array(store, mode="r")
        native = series.levels[level].axes
        scale = series.levels[0].shape[native.index("X")] / array.shape[native.index("X")]
        pixel_size = _tiff_pixel_size(tif)
        if pixel_size is not None:
            pixel_size = (pixel_size[0] * scale, pixel_size[1] * scale)
        return ImageSource(
            array, axes or native, pixel_size, name=path.name, _resources=(store, tif)
        )
    except Exception:
        tif.close()
        raise


def _tiff_pixel_size(tif) -> Optional[tuple[float, float]]:
    """Micrometres per pixel from OME, Aperio or resolution tags; None if unknown."""
    if tif.is_ome and tif.ome_metadata:
        y = re.search(r'PhysicalSizeY="([0-9.eE+-]+)"', tif.ome_metadata)
        x = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        if x and y:
            return (float(y.group(1)), float(x.group(1)))
    page = tif.pages[0]
    if tif.is_svs:
        mpp = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "")
        if mpp:
            return (float(mpp.group(1)),) * 2  # type: ignore[return-value]
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    if "XResolution" in tags and "YResolution" in tags and unit is not None:
        per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
        xres, yres = tags["XResolution"].value, tags["YResolution"].value
        if per_unit and xres[0] and yres[0] and (xres[0], xres[1]) != (1, 1):
            return (per_unit * yres[1] / yres[0], per_unit * xres[1] / xres[0])
    return None


def _open_zarr(path: Path, axes: Optional[str], level: int) -> ImageSource:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise InputError(f"input {str(path)!r} is not a zarr store ({exc})") from None
    pixel_size = None
    if isinstance(node, zarr.Group):
        attrs = node.attrs.asdict()
        multiscales = attrs.get("ome", attrs).get("multiscales")
        if not multiscales:
            raise InputError(
                f"zarr group {str(path)!r} has no OME multiscales; pass the array path inside it"
            )
        ms = multiscales[0]
        datasets = ms["datasets"]
        if not 0 <= level < len(datasets):
            raise InputError(
                f"level {level} is out of range for {path.name}: it has {len(datasets)} "
                f"level(s), 0..{len(datasets) - 1}"
            )
        node = node[datasets[level]["path"]]
        names = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])]
        if axes is None and names:
            axes = "".join({"c": "C"}.get(n.lower(), n.upper()) for n in names)
        for t in datasets[level].get("coordinateTransformations", []):
            if t.get("type") == "scale" and len(t["scale"]) == len(names):
                pixel_size = (float(t["scale"][names.index("y")]), float(t["scale"][names.index("x")]))
    elif level != 0:
        raise InputError(f"level={level} needs an OME-Zarr group; {path.name} is a plain array")
    shape = tuple(node.shape)
    return ImageSource(node, axes or _default_axes(shape), pixel_size, name=path.name)
