"""Open images lazily: `ImageSource`, the hooks a reader gives it (`Backend`), and `open_image`.

`open_image` asks each reader of `tilesegment.registry.readers` in turn
whether the target is one of its files (ours, one per format family, are in
`tilesegment.io.formats`; other packages add theirs through an entry point),
opens it with the first that says yes, then applies what every format shares:
channel order, the axes a 3-d network keeps, a read of the last pixel, and
resampling to a pixel size.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ..errors import InputError, UsageError, cause
from ..registry import readers
from .remote import is_url, url_name

__all__ = ["ImageSource", "Backend", "Level", "ReadOptions", "Origin", "open_image", "ImageLike",
           "default_axes", "check_level", "unreadable"]

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


@dataclass(frozen=True)
class Backend:
    """What a reader gives an `ImageSource` besides the array it reads: its ways into the file.

    Every part is optional; a source of an array in memory needs none. A
    reader (ours in `tilesegment.io.formats`, or a plug-in's) fills in what
    its format has, and the source does the rest (channel order, regions,
    overviews).

    Attributes
    ----------
    open_level : callable, optional
        ``open_level(index)`` returns the array of pyramid level `index`
        (one of `ImageSource.levels`), with the axes of the source's array.
        `ImageSource.at_level`, `ImageSource.overview` and ``mpp=`` read
        coarser levels through it; without it they have only the array.
    decode_chunk : callable, optional
        ``decode_chunk(*index)`` decodes the stored chunk at grid position
        `index` (one int per plan axis, on the grid of
        `ImageSource.chunk_shape`) of the source's array, as a
        ``(*plan_axes, C)`` numpy array with all the file's channels, clipped
        to the image. For formats with a faster way than slicing the array
        (a TIFF tile read with ``os.pread`` and decoded in one call); without
        it a chunk is read as a region.
    thumbnails : tuple of ((int, int), callable)
        Other small pictures of the whole image (an SVS thumbnail), as
        ``((y, x), open)`` pairs where ``open()`` returns an array with the
        source's axes. `ImageSource.overview` reads the cheapest picture.
    resources : tuple
        Open files and the like (anything with ``close()``) that
        `ImageSource.close` closes, in this order.
    """

    open_level: Optional[Callable[[int], Any]] = None
    decode_chunk: Optional[Callable[..., np.ndarray]] = None
    thumbnails: tuple[tuple[tuple[int, int], Callable[[], Any]], ...] = ()
    resources: tuple = ()


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
        What the file is ("svs", "ome-tiff", "ndpi", "qptiff", "tiff", "ome-zarr", "zarr", "array",
        or a plug-in reader's name for it).
    levels : tuple of Level
        The pyramid of the file (shape and pixel size per level), if any.
    channel_order : tuple of int, optional
        Channels to read, in this order (``channels=`` of `open_image`).
    backend : Backend
        The reader's ways into the file: other levels, a chunk decoder,
        thumbnails, files to close.
    keep_axes : str
        Stack axes kept even with one element (``"Z"`` for a 3-d network:
        a one-plane volume).
    origin : Origin, optional
        What `open_image` opened, and how, for `reopen`.
    """

    array: Any
    axes: str
    pixel_size: Optional[tuple[float, float]] = None
    name: str = "image"
    format: str = "array"
    levels: tuple["Level", ...] = ()
    channel_order: Optional[tuple[int, ...]] = None
    backend: Backend = field(default=Backend(), repr=False)
    keep_axes: str = ""
    origin: Optional["Origin"] = field(default=None, repr=False)

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
        if self.backend.decode_chunk is not None:
            return self._pick_channels(self.backend.decode_chunk(*index))
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
        backend = self.backend
        candidates = [(self.shape, lambda: self.array)]
        if backend.open_level is not None:
            candidates += [(lv.shape, lambda i=i: backend.open_level(i)) for i, lv in enumerate(self.levels)]
        candidates += list(backend.thumbnails)
        candidates = [c for c in candidates if c[0][0] <= self.shape[0] and c[0][1] <= self.shape[1]]
        fine_enough = [c for c in candidates if max(c[0]) >= max_edge]
        _, open_picture = min(fine_enough, key=lambda c: c[0][0] * c[0][1]) if fine_enough else max(
            candidates, key=lambda c: c[0][0] * c[0][1])
        source = replace(self, array=open_picture(), levels=(), backend=Backend(), origin=None)
        ny, nx = source.shape
        step = max(1, int(np.ceil(max(ny, nx) / max_edge)))
        return source.read(0, ny, 0, nx, step=step)

    def at_level(self, index: int) -> "ImageSource":
        """The same image at pyramid level `index` of `levels`, sharing this source's files.

        Raises
        ------
        InputError
            If there is no such level, or the reader cannot open levels
            (`Backend.open_level`).
        """
        check_level(index, len(self.levels), self.name)
        if self.backend.open_level is None:
            raise InputError(f"{self.name} cannot open its pyramid levels one by one; "
                             f"open it with level={index} instead")
        origin = None if self.origin is None else replace(
            self.origin, options=replace(self.origin.options, level=index))
        # The chunk decoder decodes the array of the level this source was opened at.
        return replace(self, array=self.backend.open_level(index), pixel_size=self.levels[index].pixel_size,
                       backend=replace(self.backend, decode_chunk=None), origin=origin)

    def reopen(self) -> "ImageSource":
        """An equivalent open source: the same pixels, read with the same options.

        A source that `open_image` opened is opened again with the same
        arguments (after `close`, or in another process); one built by hand
        around an array is copied, sharing the array.

        Raises
        ------
        UsageError
            If this source was built by hand around open files
            (`Backend.resources`), which it cannot open again.
        """
        if self.origin is not None:
            return self.origin.open()
        if self.backend.resources:
            raise UsageError(f"{self.name} was built around open files, not opened with open_image, "
                             "so it cannot open them again; open it with open_image")
        return replace(self)

    def close(self) -> None:
        """Close files the source holds open."""
        for resource in self.backend.resources:
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


@dataclass(frozen=True)
class Origin:
    """What `open_image` opened a source from, and with which options: enough to open it again.

    Attributes
    ----------
    image : path, URL or array
        The `image` argument of `open_image`.
    options : ReadOptions
        The options of the source itself (the level it reads; no ``mpp``:
        resampling wraps the source, see `ResampledSource`).
    storage_options : dict, optional
        As given to `open_image`.
    ndim : int
        Spatial axes of the network the source was opened for.
    """

    image: Any
    options: ReadOptions
    storage_options: Optional[dict] = None
    ndim: int = 2

    def open(self) -> "ImageSource":
        """Open `image` again with the same options."""
        return self.options.open(self.image, self.storage_options, self.ndim)


def default_axes(shape: tuple[int, ...], spatial: int = 2) -> str:
    """Axes of an array that does not say: images by default, volumes for a 3-d network.

    Parameters
    ----------
    shape : tuple of int
        The array's shape.
    spatial : int
        Spatial axes of the network: 2 reads (Y, X), (Y, X, S) with S in
        {3, 4}, else (C, Y, X); 3 reads (Z, Y, X) and (C, Z, Y, X).

    Returns
    -------
    str
        One letter per axis, e.g. ``"YXS"``.

    Raises
    ------
    InputError
        If the number of axes leaves the axes open (pass ``axes=``).
    """
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
    image : path, URL, numpy array, zarr array or dask array
        A TIFF-family file (SVS, OME-TIFF, NDPI, QPTIFF, generic tiled
        TIFF), an OME-Zarr (NGFF 0.4 or 0.5) or zarr array path, or an array
        of shape (Y, X), (Y, X, S) with S in {3, 4}, or (C, Y, X); with
        ``ndim=3``, (Z, Y, X) or (C, Z, Y, X). Files say their own axes.
        The first reader of `tilesegment.registry.readers` (by priority)
        whose ``can_open`` accepts `image` opens it; a plug-in adds formats.
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
    options = ReadOptions(axes, level if mpp is None else 0, series, channels)  # mpp picks the level later
    reader = readers.first(lambda r: r.can_open(image))
    if reader is None:
        raise _not_opened(image)
    source = reader.open(image, axes=axes, level=options.level, series=series,
                         storage_options=storage_options, ndim=ndim)
    source = replace(
        source,
        channel_order=options.channels,
        keep_axes="Z" if ndim >= 3 and "Z" in source.axes else source.keep_axes,
        origin=Origin(image, options, None if storage_options is None else dict(storage_options), ndim),
    )
    _check_readable(source)
    if mpp is not None:
        from .resample import at_pixel_size

        return at_pixel_size(source, float(mpp))
    return source


def first_bytes(target: Any, count: int) -> bytes:
    """The first `count` bytes of the local file `target`, for a reader's ``can_open``.

    Empty for URLs, objects that are not paths, folders and unreadable or
    missing files, so that ``can_open`` never raises.
    """
    if is_url(target) or not isinstance(target, (str, os.PathLike)):
        return b""
    try:
        with open(target, "rb") as f:
            return f.read(count)
    except (OSError, ValueError):  # missing, a folder, unreadable, a NUL in the name
        return b""


def reader_library(module: str, image: str, needs: str, extra: str, package: str) -> Any:
    """Import `module`, the library a reader needs for `image`, or raise the one line that
    names the extra to install (``needs`` says what the file is or needs, in words).

    Raises
    ------
    InputError
        When `module` cannot be imported.
    """
    import importlib

    try:
        importlib.import_module(module.partition(".")[0])  # a package blocked or missing, even if
        return importlib.import_module(module)             # its submodule was imported before
    except ImportError:
        raise InputError(f"{image!r} {needs}: pip install 'tilesegment[{extra}]' ({package}) "
                         "to read it") from None


def check_level(level: int, count: int, name: str) -> None:
    """Refuse a pyramid `level` outside ``0..count - 1`` of the image called `name`.

    Raises
    ------
    InputError
        Naming the levels there are.
    """
    if not 0 <= level < count:
        raise InputError(
            f"level {level} is out of range for {name}: it has {count} level(s), 0..{count - 1}"
        )


def unreadable(name: str, reason: str) -> InputError:
    """The error for a file that is no image a reader can read, listing what the readers read.

    Parameters
    ----------
    name : str
        The file, as messages call it.
    reason : str
        Why it could not be read (a format library's message).
    """
    supported = ", ".join(reader.formats for reader in readers)
    return InputError(f"input {name!r} is not a readable TIFF-family image ({reason}); supported: {supported}")


def _not_opened(image: Any) -> InputError:
    """Why no reader took `image`: missing, a folder, or a file of no known format."""
    if is_url(image):
        return unreadable(url_name(image), "no reader takes a URL with this name; a zarr store's URL ends "
                                           "in .zarr or /")
    if not isinstance(image, (str, os.PathLike)):
        return InputError(f"cannot use a {type(image).__name__} as an image")
    path = Path(image)
    if not path.exists():
        return InputError(f"input {str(path)!r} does not exist; check the path")
    if path.is_dir():
        return InputError(_folder_hint(path))
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        return unreadable(path.name, str(exc))
    return unreadable(path.name, f"no reader knows a file that starts with {head!r}" if head else "empty file")


def _check_readable(source: ImageSource) -> None:
    """Decode the last pixel: a truncated or corrupt file fails here, before any work."""
    shape = source.shape
    try:
        source.read_region([n - 1 for n in shape], shape)
    except Exception as exc:
        source.close()
        raise InputError(
            f"cannot read the end of {source.name} ({cause(exc)}); the file is "
            "truncated or corrupt, or needs a codec that is not installed (pip install imagecodecs)"
        ) from None


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


