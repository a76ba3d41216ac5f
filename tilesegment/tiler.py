"""The loader stage: read each tile's padded input from the source, batch by batch."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .errors import InvalidTileSize, TileReadError, UsageError, cause
from .geometry import Geometry, ShapeLike, axis_names
from .io.chunks import DEFAULT_CACHE_BYTES, VOLUME_CACHE_BYTES, ChunkCache
from .io.mirror import gather_nd, normalization_affine, pad_indices
from .io.sources import ImageLike, ImageSource, open_image
from .plan import TilePlan

__all__ = ["Tiler", "Batch", "check_axes", "READ_AHEAD_BYTES"]

Allocator = Callable[[tuple, np.dtype], np.ndarray]

#: Bound on the tile inputs read ahead beyond `Tiler.batches`'s ``prefetch`` batches so
#: that every reader thread has a tile (15 readers of 1200^2 RGB inputs: 65 MB in uint8).
READ_AHEAD_BYTES = 512 << 20


@dataclass(frozen=True, eq=False)
class Batch:
    """Network inputs of consecutive tiles of a plan.

    Attributes
    ----------
    indices : numpy.ndarray
        Plan indices of the tiles, shape ``(N,)``.
    data : numpy.ndarray
        Float32 network inputs, shape ``(N, C, *input_size)``: ``(N, C, h_in,
        w_in)`` for images, ``(N, C, d_in, h_in, w_in)`` for volumes and stacks.
    failed : numpy.ndarray
        Plan indices of tiles that could not be read (``on_error="skip"``);
        their inputs are zero and their outputs should be filled, not used.
    """

    indices: np.ndarray
    data: np.ndarray
    failed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.indices)


class Tiler:
    """Split an image into the padded tile inputs of a network.

    Parameters
    ----------
    image : path, numpy, zarr or dask array, or ImageSource
        The image; files are read lazily, region by region.
    geometry : Geometry or torch.nn.Module
        The network's geometry, or the network itself.
    tile_size : int or tuple of int
        Written tile edge, a multiple of the network step; one per plan axis
        or one for all.
    chunk_size : int or tuple of int, optional
        Output chunk edge (default: the tile size); see `TilePlan.build`.
    padding : str
        How pixels outside the image are made: ``"reflect"`` (default, as
        ``numpy.pad``), ``"symmetric"``, ``"edge"`` or ``"constant"`` (zero).
    normalization : (means, stds), optional
        Applied after integers are scaled to [0, 1].
    axes : str, optional
        Axes override for the image, e.g. ``"CYX"``.
    level : int
        Pyramid level of the image.
    on_error : {"raise", "skip"}
        What a tile that cannot be read (a corrupt JPEG tile in a slide) does:
        stop the run with its position, or be listed in `Batch.failed`.
    cache_bytes : int, optional
        Bound on the decoded source chunks `batches` keeps for the tiles still
        to come (see `ChunkCache`). Default: 1 GiB, or the band of chunk rows
        that one row of tile inputs spans plus one, if that is more (large
        zarr chunks or shards across a wide image): under a smaller bound a
        row-by-row scan decodes chunks again and again. Volumes and stacks
        (three or more plan axes): 64 MiB, or room for the chunks one tile
        input can span if that is more (large chunks), so memory stays bounded
        by the tile, never the volume; chunks that the z halo of the next
        slab of tiles shares with this one are decoded again rather than held
        (holding them would take a whole plane of chunks). The planes of a
        2-d network over a stack come column by column (`TilePlan`), so a
        chunk many planes deep is decoded once for all of them.

    Examples
    --------
    >>> import numpy as np, tilesegment as ts
    >>> geom = ts.Geometry(halo=4, step=8)
    >>> tiler = ts.Tiler(np.zeros((100, 60), np.uint8), geom, tile_size=32)
    >>> len(tiler.plan), tiler.plan.input_size
    (8, (40, 40))
    >>> next(tiler.batches(3)).data.shape
    (3, 1, 40, 40)
    """

    def __init__(
        self,
        image: ImageLike,
        geometry: Geometry,
        tile_size: ShapeLike = 512,
        *,
        chunk_size: Optional[ShapeLike] = None,
        padding: str = "reflect",
        normalization: Optional[tuple[Sequence[float], Sequence[float]]] = None,
        axes: Optional[str] = None,
        level: int = 0,
        on_error: str = "raise",
        cache_bytes: Optional[int] = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise UsageError(f"on_error {on_error!r} is unknown; use 'raise' or 'skip'")
        self.on_error = on_error
        self.cache_bytes = None if cache_bytes is None else int(cache_bytes)
        #: The chunk cache of the latest `batches` call (its ``decoded`` count
        #: shows how much was decoded), or None.
        self.last_cache: Optional[ChunkCache] = None
        self.geometry = Geometry.of(geometry)
        self.source: ImageSource = open_image(image, axes=axes, level=level, ndim=self.geometry.ndim)
        check_axes(self.source, self.geometry)
        try:
            self.plan = TilePlan.build(self.source.shape, self.geometry, tile_size, chunk_size,
                                       axes=self.source.plan_axes, source_chunks=self.source.chunk_shape)
        except InvalidTileSize as exc:  # say which image: the CLI may be segmenting several
            self.source.close()
            raise InvalidTileSize(f"{self.source.name}: {exc}") from None
        pad_indices(0, 1, 1, padding)  # fail now on an unknown mode, not in a thread
        self.padding = padding
        self.scale, self.offset = normalization_affine(
            self.source.dtype, self.source.channels, normalization
        )
        self._unit = np.zeros(self.source.channels, np.float32)  # no normalization

    def _spans(self, origins: np.ndarray) -> list[dict]:
        """Per axis and origin coordinate, the source indices of the padded input and their span.

        The axes are independent, so each distinct tile row, column (and
        plane) is worked out once, however many tiles share it.
        """
        n_in, halo, shape = self.plan.input_size, self.plan.geometry.halo, self.plan.shape
        tables = []
        for axis in range(len(shape)):
            table = {}
            for o in np.unique(origins[:, axis]).tolist():
                idx = pad_indices(int(o) - halo[axis], n_in[axis], shape[axis], self.padding)
                start, stop = _span(idx)
                table[o] = (_shift(idx, start), start, stop)
            tables.append(table)
        return tables

    def read(self, index: int, out: Optional[np.ndarray] = None, *, normalize: bool = True) -> np.ndarray:
        """Return the network input of tile `index`, shape ``(C, *input_size)``.

        float32 and normalized by default; with ``normalize=False`` the source
        pixels themselves (mirrored, in `input_dtype`), for a consumer that
        applies ``pixel * scale + offset`` itself (on the GPU, say).
        """
        tables = self._spans(self.plan.origins[index : index + 1])
        return self._read(index, tables, None, out, normalize)

    def _read(self, index, tables, cache, out, normalize) -> np.ndarray:
        spans = [table[int(o)] for table, o in zip(tables, self.plan.origins[index])]
        indices = [s[0] for s in spans]
        # Only the bounding box of the source pixels the (mirrored) input uses.
        start, stop = [s[1] for s in spans], [s[2] for s in spans]
        if cache is None:
            region = self.source.read_region(start, stop)
        else:
            shape = tuple(b - a for a, b in zip(start, stop))
            buffer = _scratch((*shape, self.source.channels), self.input_dtype)
            try:
                region = cache.read(start, stop, out=buffer)
            finally:
                cache.release(start, stop)
        if out is None:
            shape = (self.source.channels, *self.plan.input_size)
            out = np.empty(shape, np.float32 if normalize else self.input_dtype)
        if normalize:
            return gather_nd(region, indices, self.scale, self.offset, out)
        return gather_nd(region, indices, self._unit, self._unit, out, normalize=False)

    @property
    def input_dtype(self) -> np.dtype:
        """Dtype of unnormalized inputs (``normalize=False``): the source's own, except
        bool (as uint8) and float16 (as float32)."""
        dtype = self.source.dtype
        return np.dtype(np.uint8 if dtype == np.bool_ else np.float32 if dtype == np.float16 else dtype)

    def _allocate(self, n: int, allocate: Optional[Allocator], normalize: bool, channels_last: bool):
        c, size = self.source.channels, self.plan.input_size
        dtype = np.dtype(np.float32) if normalize else self.input_dtype
        allocate = allocate or np.empty
        if channels_last:
            return np.moveaxis(allocate((n, *size, c), dtype), -1, 1)
        return allocate((n, c, *size), dtype)

    def _read_tile(self, index: int, out: np.ndarray, tables, cache, normalize: bool) -> bool:
        """Read tile `index` into `out`; False if it could not be read and is skipped."""
        try:
            self._read(index, tables, cache, out, normalize)
            return True
        except Exception as exc:
            if self.on_error == "raise":
                raise TileReadError(
                    f"cannot read tile {index} at {self.plan.position(index)} of {self.source.name}: "
                    f"{cause(exc)}; the file may be corrupt there "
                    "(on_error='skip' / --on-error=skip fills such tiles and records them)"
                ) from exc
            out[...] = 0
            return False

    def batch(
        self,
        indices: Sequence[int],
        allocate: Optional[Allocator] = None,
        *,
        normalize: bool = True,
        channels_last: bool = False,
    ) -> Batch:
        """Read the tiles `indices` into one `Batch`, in the calling thread.

        `allocate(shape, dtype)` may supply the array to fill (e.g. pinned
        memory for asynchronous device copies). `normalize` as in `read`;
        `channels_last` as in `batches`.
        """
        indices = np.asarray(indices, dtype=np.int64)
        tables = self._spans(self.plan.origins[indices])
        data = self._allocate(len(indices), allocate, normalize, channels_last)
        ok = [self._read_tile(int(i), data[k], tables, None, normalize) for k, i in enumerate(indices)]
        return Batch(indices, data, indices[~np.asarray(ok, bool)])

    def chunk_cache(self, tiles: Optional[Sequence[int]] = None) -> Optional[ChunkCache]:
        """A cache that decodes each stored chunk once for reading `tiles` (default: all),
        or None for sources held in memory."""
        order = np.arange(self.plan.n_tiles) if tiles is None else np.asarray(tiles, np.int64)
        return self._chunk_cache(order, self._spans(self.plan.origins[order]))

    def _chunk_cache(self, order: np.ndarray, tables: list[dict]) -> Optional[ChunkCache]:
        if self.source.chunk_shape is None:
            return None
        # Source span of every tile, from the per-axis tables `_spans` made.
        origins = self.plan.origins[order]
        parts = []
        for axis, table in enumerate(tables):
            unique, inverse = np.unique(origins[:, axis], return_inverse=True)
            parts.append(np.array([table[int(o)][1:] for o in unique], np.int64).reshape(-1, 2)[inverse])
        spans = np.concatenate(parts, axis=1)
        budget = self.cache_bytes
        if budget is None and len(tables) > 2:
            # Bounded by the tile and the chunks, never the volume: at least room for the
            # chunks one tile input can span (large chunks: each tile needs several whole).
            edges, n_in = self.source.chunk_shape, self.plan.input_size
            span = np.prod([(-(-n // e) + 1) * e for n, e in zip(n_in, edges)])
            budget = max(VOLUME_CACHE_BYTES, int(span * self.source.channels * self.input_dtype.itemsize))
        elif budget is None:
            # One band of chunk rows across the image, as deep as a tile input, plus two.
            (cy, cx), (n_in, width) = self.source.chunk_shape, (self.plan.input_size[0], self.source.shape[1])
            row = -(-width // cx) * cy * cx * self.source.channels * self.input_dtype.itemsize
            budget = max(DEFAULT_CACHE_BYTES, (-(-n_in // cy) + 2) * row)
        return ChunkCache(self.source, spans, budget)

    def batches(
        self,
        batch_size: int = 1,
        *,
        tiles: Optional[Sequence[int]] = None,
        prefetch: int = 2,
        workers: int = 2,
        allocate: Optional[Allocator] = None,
        normalize: bool = True,
        channels_last: bool = False,
    ) -> Iterator[Batch]:
        """Yield batches of tile inputs in plan order, reading ahead in threads.

        Parameters
        ----------
        batch_size : int
            Tiles per batch (the last batch may be smaller).
        tiles : sequence of int, optional
            Plan indices to read (default: all); kept in the given order.
        prefetch : int
            Batches read ahead of the consumer, and more while fewer tiles than
            `workers` are queued, so that no reader thread idles for want of a
            tile (small batches, many readers). Memory is ``(prefetch + 1) *
            batch`` inputs, or `workers` plus a batch if that is more, and the
            extra tiles stay within `READ_AHEAD_BYTES`.
        workers : int
            Reader threads (0 reads in the calling thread); each reads whole
            tiles, and a batch is ready when its tiles are. Decoding and the
            gather kernel release the GIL.
        allocate : callable, optional
            ``allocate(shape, dtype) -> array`` for each batch's data.
        normalize : bool
            float32 normalized inputs (default), or the source pixels (see `read`).
        channels_last : bool
            Lay each batch out in memory as ``(N, h, w, C)`` while `Batch.data`
            keeps its ``(N, C, h, w)`` shape (a transposed view; NDHWC for
            volumes): the layout
            channels-last networks run on, so the executor need not copy.

        Notes
        -----
        Stored chunks (TIFF tiles, zarr chunks) that several tile inputs
        overlap are decoded once and shared (`ChunkCache`), so the halo does
        not multiply decoding work. Reading starts when the stream is made,
        not at its first batch, so whatever the caller sets up meanwhile (an
        output, a model on its device) overlaps it; ``close()`` the stream
        (or read it to the end) to stop the readers.
        """
        if int(batch_size) < 1:
            raise UsageError(f"batch_size {batch_size} must be at least 1")
        order = np.arange(self.plan.n_tiles) if tiles is None else np.asarray(tiles, np.int64)
        tables = self._spans(self.plan.origins[order])
        cache = self.last_cache = self._chunk_cache(order, tables)
        groups = (order[i : i + int(batch_size)] for i in range(0, len(order), int(batch_size)))
        dtype = np.dtype(np.float32) if normalize else self.input_dtype
        tile_bytes = self.source.channels * int(np.prod(self.plan.input_size)) * dtype.itemsize

        def start(group, run):
            data = self._allocate(len(group), allocate, normalize, channels_last)
            reads = [run(self._read_tile, int(i), data[k], tables, cache, normalize)
                     for k, i in enumerate(group)]
            return group, data, reads

        def finish(group, data, reads) -> Batch:
            ok = np.asarray([r.result() if hasattr(r, "result") else r for r in reads], bool)
            return Batch(group, data, group[~ok])

        return _BatchStream(groups, start, finish, prefetch, workers, cache, tile_bytes)

    def close(self) -> None:
        """Close the image file, if any."""
        self.source.close()

    def __enter__(self) -> "Tiler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _BatchStream(Iterator["Batch"]):
    """Batches read ahead by a thread pool; the first ones are submitted at once.

    At most ``prefetch + 1`` batches are submitted and not yet handed out, as
    a generator reading ahead would keep, or more while fewer tiles than
    reader threads are (within `READ_AHEAD_BYTES`). Tiles, not batches, are
    the unit of work: every reader thread is busy whether few large batches
    are in flight (a GPU's batch of 16 tiles at 1024) or many small ones.
    """

    def __init__(self, groups: Iterator[np.ndarray], start: Callable, finish: Callable, prefetch: int,
                 workers: int, cache: Optional[ChunkCache], tile_bytes: int) -> None:
        self._groups, self._start, self._finish = groups, start, finish
        self._prefetch, self._workers, self._cache = prefetch, workers, cache
        self._pending: deque = deque()
        self._queued, self._tile_bytes = 0, tile_bytes  # tiles submitted and not yet handed out
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tilesegment-read") if workers > 0 else None
        self._closed = False
        while self._pool is not None and self._wants_more() and self._submit():
            pass

    def _wants_more(self) -> bool:
        if len(self._pending) <= self._prefetch:
            return True
        return self._queued < self._workers and self._queued * self._tile_bytes < READ_AHEAD_BYTES

    def _submit(self) -> bool:
        group = next(self._groups, None)
        if group is not None:
            self._pending.append(self._start(group, self._pool.submit))
            self._queued += len(group)
        return group is not None

    def __iter__(self) -> "_BatchStream":
        return self

    def __next__(self) -> "Batch":
        if self._closed:
            raise StopIteration
        try:
            if self._pool is None:  # read in the calling thread
                group = next(self._groups, None)
                if group is not None:
                    return self._finish(*self._start(group, lambda f, *a: f(*a)))
            else:
                while self._wants_more() and self._submit():
                    pass
                if self._pending:
                    group, data, reads = self._pending.popleft()
                    self._queued -= len(group)
                    return self._finish(group, data, reads)
        except BaseException:
            self.close()
            raise
        self.close()
        raise StopIteration

    def close(self) -> None:
        """Stop reading: queued tiles are dropped, tiles being read finish; decoded chunks are freed."""
        if self._closed:
            return
        self._closed = True
        for _, _, reads in self._pending:
            for future in reads:
                future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._cache is not None:
            self._cache.clear()  # a run stopped early leaves no decoded chunks behind

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)


def check_axes(source: ImageSource, geometry: Geometry) -> None:
    """Refuse an image without the axes the network runs over (a 3-d network needs
    Z, Y, X, and does not take T for Z)."""
    own = geometry.ndim - geometry.stack_axes  # a stacked geometry names its network's axes only
    if source.ndim < geometry.ndim or not source.plan_axes.endswith(axis_names(own).upper()):
        raise UsageError(
            f"the network is {geometry.ndim}-d ({', '.join(axis_names(geometry.ndim))}) but "
            f"{source.name} has axes {source.plan_axes}; pass axes= to name its "
            f"{axis_names(geometry.ndim).upper()} axes (e.g. axes='ZYX' for a (Z, Y, X) array)"
        )


def _span(indices: np.ndarray) -> tuple[int, int]:
    inside = indices[indices >= 0]
    if inside.size == 0:
        return 0, 1
    return int(inside.min()), int(inside.max()) + 1


def _shift(indices: np.ndarray, start: int) -> np.ndarray:
    return np.where(indices >= 0, indices - start, -1)


_local = threading.local()


def _scratch(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A per-thread buffer for a tile's source region, reused while its size allows,
    so each tile does not fault in fresh pages."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = getattr(_local, "buffer", None)
    if buf is None or buf.nbytes < size:
        buf = _local.buffer = np.empty(size, np.uint8)
    return buf[:size].view(dtype).reshape(shape)
