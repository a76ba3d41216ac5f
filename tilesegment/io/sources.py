"""Open images lazily: TIFF family (tifffile), zarr, numpy and dask arrays."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from .remote import is_url, open_remote_file, url_name

__all__ = ["ImageSource", "Level", "ReadOptions", "open_image", "ImageLike"]

ImageLike = Union[str, os.PathLike, np.ndarray, Any]
#: Axes a plan runs over, in the order plans (and outputs) keep them: T and Z are
#: stack axes of a 2-D network, Z is also the third axis of a volume network.
_SPATIAL = "TZYX"
_CHANNEL = "CS"


@dataclass(frozen=True)
class Level:
    """One level of an image pyramid: spatial shape and pixel size (um), if known."""

    shape: tuple[int, ...]
    pixel_size: Optional[tuple[float, ...]] = None


@dataclass(frozen=True, eq=False)
class ImageSource:
    """An image or volume with channels, read region by region in its native layout.

    The axes a plan runs over (`plan_axes`) are those of ``T``, ``Z``, ``Y``,
    ``X`` that the image has with more than one element (``Y`` and ``X``
    always), in that order, whatever the order in the file: ``"YX"`` for a
    slide, ``"ZYX"`` for a volume or a Z stack, ``"TYX"``, ``"TZYX"``. Regions
    are read in that order, channels last.

    Attributes
    ----------
    array : array-like
        Anything with ``shape``, ``dtype`` and numpy slicing (numpy, zarr,
        dask, tifffile's zarr store).
    axes : str
        One letter per axis of `array`: ``Y``, ``X``, optionally ``Z`` and
        ``T``, at most one channel axis ``C`` or ``S``, and other axes of size
        1 (squeezed).
    pixel_size : tuple of float or None
        Physical size of a pixel (voxel) along each plan axis, in micrometres
        (``(y, x)``, ``(z, y, x)``; a ``T`` axis gets 1.0), when the file says.
    name : str
        What to call the image in messages.
    format : str
        What the file is ("svs", "ome-tiff", "ndpi", "qptiff", "tiff", "ome-zarr", "zarr", "array").
    levels : tuple of Level
        The pyramid of the file (shape and pixel size per level), if any.
    channel_order : tuple of int, optional
        Channels to read, in this order (``channels=`` of `open_image`).
    """

    array: Any
    axes: str
    pixel_size: Optional[tuple[float, float]] = None
    name: str = "image"
    format: str = "array"
    levels: tuple["Level", ...] = ()
    channel_order: Optional[tuple[int, ...]] = None
    _open_level: Optional[Callable[[int], Any]] = field(default=None, repr=False)
    _resources: tuple = field(default=(), repr=False)
    _decode_chunk: Optional[Callable[[int, int], np.ndarray]] = field(default=None, repr=False)
    #: Other small pictures of the whole image (an SVS thumbnail): ((Y, X), open) pairs.
    _thumbnails: tuple = field(default=(), repr=False)
    #: Stack axes kept even with one element (Z for a 3-d network: a one-plane volume).
    keep_axes: str = ""

    def __post_init__(self) -> None:
        axes = self.axes.upper()
        object.__setattr__(self, "axes", axes)
        shape = tuple(self.array.shape)
        if len(axes) != len(shape):
            raise InputError(
                f"axes {axes!r} do not match the {len(shape)}-d shape {shape} of {self.name}; "
                "pass axes= with one letter per axis, e.g. 'YXS' or 'CYX'"
            )
        if (any(axes.count(a) != 1 for a in "YX") or any(axes.count(a) > 1 for a in "TZ")
                or sum(a in _CHANNEL for a in axes) > 1):
            raise InputError(
                f"axes {axes!r} of {self.name} need exactly one Y, one X, at most one Z and T and at "
                "most one channel axis (C or S); pass axes= to say which is which"
            )
        extra = [(a, n) for a, n in zip(axes, shape) if a not in _SPATIAL + _CHANNEL and n != 1]
        if extra:
            raise InputError(
                f"{self.name} has non-spatial axes {extra} larger than 1 (axes {axes}); "
                "pass axes= to name them (T, Z, Y, X, C) or select one plane first (e.g. image[0])"
            )
        if 0 in shape:
            raise InputError(f"{self.name} is empty (shape {shape})")
        dtype = np.dtype(self.array.dtype)
        if dtype.kind not in "uif" and dtype != np.bool_:
            raise InputError(f"{self.name} has dtype {dtype}; expected an integer or float image")
        if self.channel_order is not None:
            native = self._native_channels
            bad = [c for c in self.channel_order if not 0 <= c < native]
            if bad or not self.channel_order:
                raise InputError(
                    f"channels {list(self.channel_order)} do not exist in {self.name}, which has "
                    f"{native} channel(s) (0..{native - 1})"
                )

    @functools.cached_property
    def plan_axes(self) -> str:
        """The axes plans run over, in plan order: ``"YX"``, ``"ZYX"``, ``"TYX"``, ``"TZYX"``."""
        shape = self.array.shape
        return "".join(a for a in _SPATIAL if a in "YX" + self.keep_axes
                       or (a in self.axes and shape[self.axes.index(a)] > 1))

    @property
    def ndim(self) -> int:
        """Number of plan axes (2 for a slide, 3 for a volume or a stack)."""
        return len(self.plan_axes)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape over the plan axes: ``(Y, X)``, ``(Z, Y, X)``..."""
        s = self.array.shape
        return tuple(int(s[self.axes.index(a)]) for a in self.plan_axes)

    @property
    def _native_channels(self) -> int:
        for i, a in enumerate(self.axes):
            if a in _CHANNEL:
                return int(self.array.shape[i])
        return 1

    @property
    def channels(self) -> int:
        """Number of channels read (1 when the image has no channel axis)."""
        return len(self.channel_order) if self.channel_order is not None else self._native_channels

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def chunk_shape(self) -> Optional[tuple[int, ...]]:
        """Edges, over the plan axes, of the units the image is stored and decoded in
        (TIFF tiles, zarr or dask chunks); None for arrays in memory, which need no decoding."""
        if isinstance(self.array, np.ndarray):
            return None
        # A zarr shard is read in one request; its inner chunks are the smaller unit.
        chunks = (getattr(self.array, "shards", None) or getattr(self.array, "chunksize", None)
                  or getattr(self.array, "chunks", None))
        if not chunks or not all(isinstance(c, (int, np.integer)) for c in chunks):
            return None
        return tuple(int(chunks[self.axes.index(a)]) for a in self.plan_axes)

    def read_chunk(self, *index: int) -> np.ndarray:
        """Decode the stored chunk at grid position `index` (one int per plan axis) as a
        ``(*plan_axes, C)`` array, clipped to the image."""
        if self._decode_chunk is not None:
            return self._pick_channels(self._decode_chunk(*index))
        edges, shape = self.chunk_shape, self.shape
        return self.read_region(tuple(i * e for i, e in zip(index, edges)),
                                tuple(min(n, (i + 1) * e) for i, e, n in zip(index, edges, shape)))

    def read_region(self, start: Sequence[int], stop: Sequence[int], step: int = 1) -> np.ndarray:
        """Return pixels ``[start:stop:step]`` (one bound per plan axis) as a
        ``(*plan_axes, C)`` array, a view where possible."""
        plan = self.plan_axes
        index, order = [], []
        for axis in self.axes:
            if axis in plan:
                k = plan.index(axis)
                index.append(slice(int(start[k]), int(stop[k]), step))
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
        if region.dtype == np.float16:  # the gather kernel has no float16
            region = region.astype(np.float32)
        if len(order) == len(plan):
            region = region[..., None]
            order.append("C")
        channel = next(a for a in order if a not in plan)
        return self._pick_channels(region.transpose([order.index(a) for a in plan + channel]))

    def read(self, y0: int, y1: int, x0: int, x1: int, step: int = 1) -> np.ndarray:
        """Return pixels ``[y0:y1:step, x0:x1:step]`` of a 2-D image as a ``(Y, X, C)`` array.

        The 2-D shorthand of `read_region`.
        """
        if self.ndim != 2:
            raise InputError(f"{self.name} has axes {self.plan_axes}; read it with read_region")
        return self.read_region((y0, x0), (y1, x1), step)

    def _pick_channels(self, region: np.ndarray) -> np.ndarray:
        if self.channel_order is not None:
            region = region[..., list(self.channel_order)]
        return region

    def overview(self, max_edge: int = 2048) -> np.ndarray:
        """A ``(y, x, C)`` picture of the whole image, at most about `max_edge` pixels a side.

        Reads the smallest stored picture of the whole image that is still at
        least `max_edge` wide (a pyramid level or a thumbnail, when the file
        has them; no larger than this image), then keeps every n-th pixel.
        The cost is that of the picture read, not of the image.
        """
        if self.ndim != 2:
            raise InputError(f"{self.name} has axes {self.plan_axes}: only 2-d images have an overview")
        candidates = [(self.shape, lambda: self.array)]
        if self._open_level is not None:
            candidates += [(lv.shape, lambda i=i: self._open_level(i)) for i, lv in enumerate(self.levels)]
        candidates += list(self._thumbnails)
        candidates = [c for c in candidates if c[0][0] <= self.shape[0] and c[0][1] <= self.shape[1]]
        fine_enough = [c for c in candidates if max(c[0]) >= max_edge]
        _, open_picture = min(fine_enough, key=lambda c: c[0][0] * c[0][1]) if fine_enough else max(
            candidates, key=lambda c: c[0][0] * c[0][1])
        source = replace(self, array=open_picture(), levels=(), _resources=(), _decode_chunk=None,
                         _thumbnails=())
        ny, nx = source.shape
        step = max(1, int(np.ceil(max(ny, nx) / max_edge)))
        return source.read(0, ny, 0, nx, step=step)

    def close(self) -> None:
        """Close files the source holds open."""
        for resource in self._resources:
            resource.close()


@dataclass(frozen=True)
class ReadOptions:
    """Which pixels of a file to read: the options of `open_image` as one value.

    The run record (resume checks), the tasks of a distributed run and the
    API share it, so the options are listed once.
    """

    axes: Optional[str] = None
    level: int = 0
    series: int = 0
    channels: Optional[tuple[int, ...]] = None
    mpp: Optional[float] = None

    def __post_init__(self) -> None:
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))

    def to_dict(self) -> dict:
        """Plain values (JSON-ready), keyed like `open_image`'s parameters."""
        return {"axes": self.axes, "level": self.level, "series": self.series,
                "channels": None if self.channels is None else list(self.channels), "mpp": self.mpp}

    def open(self, image: "ImageLike", storage_options: Optional[dict] = None, ndim: int = 2) -> "ImageSource":
        """`open_image` of `image` with these options, for a network of `ndim` spatial axes."""
        return open_image(image, **self.to_dict(), storage_options=storage_options, ndim=ndim)


def _default_axes(shape: tuple[int, ...], spatial: int = 2) -> str:
    """Axes of an array that does not say: images by default, volumes for a 3-d network
    (`spatial` = 3): (Z, Y, X) and (C, Z, Y, X)."""
    if spatial == 3 and len(shape) in (3, 4):
        return "ZYX" if len(shape) == 3 else "CZYX"
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "YXS" if shape[-1] in (3, 4) else "CYX"
    raise InputError(
        f"cannot tell the axes of a {len(shape)}-d array of shape {shape}; "
        "pass axes=, e.g. 'YX', 'YXS', 'CYX', 'ZYX' or 'CZYX'"
    )


def open_image(
    image: ImageLike,
    axes: Optional[str] = None,
    level: int = 0,
    *,
    series: int = 0,
    channels: Optional[Sequence[int]] = None,
    mpp: Optional[float] = None,
    storage_options: Optional[dict] = None,
    ndim: int = 2,
) -> ImageSource:
    """Open `image` for region reads without loading it.

    Parameters
    ----------
    image : path, numpy array, zarr array or dask array
        A TIFF-family file (SVS, OME-TIFF, NDPI, QPTIFF, generic tiled
        TIFF), an OME-Zarr (NGFF 0.4 or 0.5) or zarr array path, or an array
        of shape (Y, X), (Y, X, S) with S in {3, 4}, or (C, Y, X); with
        ``ndim=3``, (Z, Y, X) or (C, Z, Y, X). Files say their own axes.
    axes : str, optional
        Override the axes, one letter per dimension (``T``, ``Z``, ``Y``,
        ``X``, ``C``/``S``; other letters must have size 1), e.g. ``"ZYX"``
        for a Z stack held as a 3-d array.
    level : int
        Pyramid level to read (0 is full resolution).
    series : int
        Series of a multi-series TIFF.
    channels : sequence of int, optional
        Channels to read, in the model's order (e.g. ``[2, 0, 1]``).
    mpp : float, optional
        Target pixel size in micrometres: the finest-but-not-finer level is
        read and area-resampled to exactly `mpp` (see `ResampledSource`).
        Overrides `level`.
    storage_options : dict, optional
        For URLs (``s3://``, ``gs://``, ``https://``...): arguments of the
        fsspec filesystem (e.g. ``{"anon": True}``, ``{"endpoint_url": ...}``),
        plus ``block_size``, the bytes per range request of a remote TIFF.
        Credentials and endpoints otherwise come from the usual environment
        (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``...). A remote TIFF is read in
        ranges, only the tiles a region needs; a remote zarr chunk by chunk.
    ndim : int
        Spatial axes of the network that will read the image: how arrays
        that do not name their axes are read (3: volumes).

    Raises
    ------
    InputError
        If the file is missing or not an image, the axes cannot be told, or
        a level, series or channel does not exist.
    """
    if hasattr(image, "read") and hasattr(image, "channels"):  # already a source
        return image
    if is_url(image):
        source = _open_url(image, axes, level if mpp is None else 0, series, storage_options, ndim)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise InputError(f"input {str(path)!r} does not exist; check the path")
        opener = _open_zarr if path.is_dir() or path.suffix == ".zarr" else _open_tiff
        source = opener(path, axes, level if mpp is None else 0, series, ndim=ndim)
    else:
        source = _open_array(image, axes, level, ndim)
    if channels is not None:
        source = replace(source, channel_order=tuple(int(c) for c in channels))
    if ndim >= 3 and "Z" in source.axes:
        source = replace(source, keep_axes="Z")
    _check_readable(source)
    if mpp is not None:
        from .resample import at_pixel_size

        return at_pixel_size(source, float(mpp))
    return source


def _check_readable(source: ImageSource) -> None:
    """Decode the last pixel: a truncated or corrupt file fails here, before any work."""
    shape = source.shape
    try:
        source.read_region([n - 1 for n in shape], shape)
    except Exception as exc:
        source.close()
        raise InputError(
            f"cannot read the end of {source.name} ({type(exc).__name__}: {exc}); the file is "
            "truncated or corrupt, or needs a codec that is not installed (pip install imagecodecs)"
        ) from None


def _open_array(image: Any, axes: Optional[str], level: int, ndim: int = 2) -> ImageSource:
    if not hasattr(image, "shape") or not hasattr(image, "dtype"):
        try:
            image = np.asarray(image)
        except Exception as exc:
            raise InputError(f"cannot use a {type(image).__name__} as an image: {exc}") from exc
    if level != 0:
        raise InputError(f"level {level} is out of range: an array has only level 0")
    shape = tuple(image.shape)
    return ImageSource(image, axes or _default_axes(shape, ndim), name=f"array {shape}")


def _check_level(level: int, count: int, name: str) -> None:
    if not 0 <= level < count:
        raise InputError(
            f"level {level} is out of range for {name}: it has {count} level(s), 0..{count - 1}"
        )


def _tiff_format(tif) -> str:
    for flag, name in (("is_svs", "svs"), ("is_ndpi", "ndpi"), ("is_qpi", "qptiff"), ("is_ome", "ome-tiff")):
        if getattr(tif, flag, False):
            return name
    return "tiff"


def _open_url(url: str, axes: Optional[str], level: int, series: int,
              storage_options: Optional[dict], ndim: int = 2) -> ImageSource:
    """A remote TIFF through a range-reading file object, or a remote zarr store."""
    name = url_name(url)
    if name.lower().endswith(".zarr") or url.split("?", 1)[0].endswith("/"):
        return _open_zarr(url, axes, level, series, storage_options, ndim)
    handle = open_remote_file(url, storage_options)
    try:
        source = _open_tiff(handle, axes, level, series, name=name)
    except BaseException:
        handle.close()
        raise
    # tifffile leaves file objects it was given open: close it with the source.
    return replace(source, _resources=(*source._resources, handle))


def _open_tiff(path: Any, axes: Optional[str], level: int, series: int,
               name: Optional[str] = None, ndim: int = 2) -> ImageSource:
    """A TIFF-family file from a path or a seekable binary file object (named `name`)."""
    import tifffile
    import zarr

    name = name or Path(path).name
    try:
        tif = tifffile.TiffFile(path, name=name) if not isinstance(path, (str, os.PathLike)) \
            else tifffile.TiffFile(path)
        all_series = tif.series
    except Exception as exc:
        raise InputError(
            f"input {name!r} is not a readable TIFF-family image ({exc}); "
            "supported: TIFF, SVS, OME-TIFF, NDPI, QPTIFF, OME-Zarr"
        ) from None
    resources: tuple = (tif,)  # closed again if anything below fails
    try:
        if not 0 <= series < len(all_series):
            raise InputError(
                f"series {series} is out of range for {name}: it has {len(all_series)} "
                f"series, 0..{len(all_series) - 1}"
            )
        chosen = all_series[series]
        _check_level(level, len(chosen.levels), name)
        native = chosen.levels[0].axes

        def open_level(index: int):
            return zarr.open_array(chosen.aszarr(level=index), mode="r")

        try:
            array = open_level(level)
        except Exception as exc:
            raise InputError(f"cannot read {name} (level {level}): {exc}") from None
        named = (axes or chosen.levels[level].axes).upper()  # an override names every level's axes
        plan = ImageSource(array, named, name=name).plan_axes
        base, z = _tiff_pixel_size(tif), _tiff_z_spacing(tif)
        levels = []
        for lv in chosen.levels:  # TIFF pyramids shrink y and x only
            scale = chosen.levels[0].shape[named.index("X")] / lv.shape[named.index("X")]
            # An unknown z spacing is taken as the x pixel size: isotropic, the neutral guess.
            size = None if base is None else {"Y": base[0] * scale, "X": base[1] * scale, "Z": z or base[1]}
            levels.append(Level(tuple(int(lv.shape[named.index(a)]) for a in plan),
                                None if size is None else tuple(size.get(a, 1.0) for a in plan)))
        # Remote files (file objects) are read through tifffile's own range requests.
        local = isinstance(path, (str, os.PathLike))
        decoder = _TileDecoder.of(path, chosen.levels[level]) if local and not axes else None
        if decoder is not None:
            resources = (tif, decoder)
        return ImageSource(
            array, axes or chosen.levels[level].axes, levels[level].pixel_size, name=name,
            format=_tiff_format(tif), levels=tuple(levels), _open_level=open_level,
            _resources=resources, _decode_chunk=decoder,
            _thumbnails=_tiff_thumbnails(all_series, chosen, native),
        )
    except Exception:
        for resource in resources:
            resource.close()
        raise


def _tiff_thumbnails(all_series, chosen, axes: str) -> tuple:
    """Other series that picture the whole of `chosen`, smaller (an SVS "Thumbnail"): same
    axes and channels, same aspect ratio within 2 %. Labels and macro photos differ in aspect."""
    import zarr

    y, x = axes.index("Y"), axes.index("X")
    full = chosen.levels[0].shape
    found = []
    for other in all_series:
        shape = other.shape
        if other is chosen or other.axes != axes or len(other.levels) != 1 or shape[y] >= full[y]:
            continue
        if [n for i, n in enumerate(shape) if i not in (y, x)] != [n for i, n in enumerate(full) if i not in (y, x)]:
            continue
        if abs(shape[y] / shape[x] - full[y] / full[x]) <= 0.02 * full[y] / full[x]:
            found.append(((int(shape[y]), int(shape[x])), lambda s=other: zarr.open_array(s.aszarr(), mode="r")))
    return tuple(found)


class _TileDecoder:
    """Decode one tile of a tiled TIFF page straight from the file.

    tifffile's zarr store costs about 0.5 ms per tile on top of the 1.3 ms a
    256-px JPEG tile takes to decode; reading the tile's bytes with `os.pread`
    (thread-safe, no shared file position) and calling the page's own decoder
    (which releases the GIL in imagecodecs) leaves only the decoding.
    """

    def __init__(self, path: Path, page, shape: tuple[int, int]) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._page = page
        self._shape = shape
        self._tile = (int(page.tilelength), int(page.tilewidth))
        self._across = -(-shape[1] // self._tile[1])

    @classmethod
    def of(cls, path: Path, series) -> Optional["_TileDecoder"]:
        """A decoder for the single, tiled, 2-D (samples interleaved) page of `series`, else None."""
        pages = getattr(series, "pages", ())
        if len(pages) != 1:
            return None
        page = pages[0]
        plain = getattr(page, "is_tiled", False) and getattr(page, "tiledepth", 1) == 1
        interleaved = page.samplesperpixel == 1 or int(page.planarconfig) == 1
        if not (plain and interleaved and series.axes in ("YX", "YXS")):
            return None
        shape = (int(page.imagelength), int(page.imagewidth))
        return cls(path, page, shape)

    def __call__(self, cy: int, cx: int) -> np.ndarray:
        page, index = self._page, cy * self._across + cx
        count, offset = int(page.databytecounts[index]), int(page.dataoffsets[index])
        (hy, hx), (ny, nx) = self._tile, self._shape
        shape = (min(hy, ny - cy * hy), min(hx, nx - cx * hx), int(page.samplesperpixel))
        if not count:  # a tile the file leaves out (Philips slides: background): nodata, as tifffile
            return np.full(shape, page.nodata or 0, page.dtype)
        data = os.pread(self._fd, count, offset)
        tile, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        return tile.reshape(*self._tile, -1)[: shape[0], : shape[1]]

    def close(self) -> None:
        os.close(self._fd)


def _tiff_z_spacing(tif) -> Optional[float]:
    """Micrometres between Z planes from OME (PhysicalSizeZ) or ImageJ (spacing); None if unknown."""
    if tif.is_ome and tif.ome_metadata:
        z = re.search(r'PhysicalSizeZ="([0-9.eE+-]+)"', tif.ome_metadata)
        if z:
            return float(z.group(1))
    spacing = (getattr(tif, "imagej_metadata", None) or {}).get("spacing")
    return float(spacing) if spacing else None


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
    # ImageJ says its unit in the description (unit=micron) and leaves the tag at NONE.
    imagej_unit = (getattr(tif, "imagej_metadata", None) or {}).get("unit")
    if "XResolution" in tags and "YResolution" in tags and (unit is not None or imagej_unit):
        per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value)) if unit is not None else None
        if imagej_unit in ("micron", "um", "µm", "\\u00B5m"):
            per_unit = 1.0
        xres, yres = tags["XResolution"].value, tags["YResolution"].value
        if per_unit and xres[0] and yres[0] and (xres[0], xres[1]) != (1, 1):
            return (per_unit * yres[1] / yres[0], per_unit * xres[1] / xres[0])
    return None


def _folder_hint(folder: Path) -> str:
    """Why a folder is not an input, and the glob that names the slides in it."""
    suffixes: dict[str, int] = {}
    for f in folder.iterdir():
        if f.is_file() and f.suffix:
            suffixes[f.suffix.lower()] = suffixes.get(f.suffix.lower(), 0) + 1
    slides = {k: n for k, n in suffixes.items() if k in (".svs", ".ndpi", ".tif", ".tiff", ".qptiff", ".scn")}
    if not slides:
        return (f"input {str(folder)!r} is a folder, not an image or a zarr store; pass an image file, "
                "or a quoted glob such as 'folder/*.svs' to segment several")
    suffix, n = max(slides.items(), key=lambda kv: kv[1])
    return (f"input {str(folder)!r} is a folder, not an image; to segment the {n} {suffix} file(s) in it, "
            f"pass the quoted glob '{folder / ('*' + suffix)}' (CLI; in Python, loop over them)")


def _open_zarr(path: Union[Path, str], axes: Optional[str], level: int, series: int = 0,
               storage_options: Optional[dict] = None, ndim: int = 2) -> ImageSource:
    import zarr

    remote = is_url(path)
    name = url_name(path) if remote else Path(path).name
    options = {}
    if remote:  # block_size is ours (remote TIFFs), not the filesystem's
        options["storage_options"] = {k: v for k, v in (storage_options or {}).items() if k != "block_size"}
    try:
        node = zarr.open(str(path), mode="r", **options)
    except Exception as exc:
        if not remote and Path(path).is_dir():
            raise InputError(_folder_hint(Path(path))) from None
        raise InputError(f"input {str(path)!r} is not a zarr store ({exc})") from None
    if not isinstance(node, zarr.Group):
        _check_level(level, 1, name)
        return ImageSource(node, axes or _default_axes(tuple(node.shape), ndim), name=name, format="zarr")
    attrs = node.attrs.asdict()
    multiscales = attrs.get("ome", attrs).get("multiscales")  # NGFF 0.5 nests under "ome"
    if not multiscales:
        raise InputError(
            f"zarr group {str(path)!r} has no OME multiscales; pass the array path inside it"
        )
    ms = multiscales[0]
    datasets = ms["datasets"]
    _check_level(level, len(datasets), name)
    names = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])]
    if axes is None and names:
        axes = "".join({"c": "C"}.get(n.lower(), n.upper()) for n in names)
    chosen = node[datasets[level]["path"]]
    axes = axes or _default_axes(tuple(chosen.shape), ndim)
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
    return ImageSource(
        chosen, axes, levels[level].pixel_size, name=name, format="ome-zarr", levels=tuple(levels),
        _open_level=lambda i: node[datasets[i]["path"]],
    )
