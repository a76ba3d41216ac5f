"""The loader stage: read each tile's padded input from the source, batch by batch."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .errors import TileReadError, UsageError
from .geometry import Geometry, PairLike
from .io.mirror import gather, normalization_affine, pad_indices
from .io.sources import ImageLike, ImageSource, open_image
from .plan import TilePlan

__all__ = ["Tiler", "Batch"]

Allocator = Callable[[tuple], np.ndarray]


@dataclass(frozen=True, eq=False)
class Batch:
    """Network inputs of consecutive tiles of a plan.

    Attributes
    ----------
    indices : numpy.ndarray
        Plan indices of the tiles, shape ``(N,)``.
    data : numpy.ndarray
        Float32 network inputs, shape ``(N, C, h_in, w_in)``.
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
    tile_size : int or (int, int)
        Written tile edge, a multiple of the network step.
    chunk_size : int or (int, int), optional
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
        tile_size: PairLike = 512,
        *,
        chunk_size: Optional[PairLike] = None,
        padding: str = "reflect",
        normalization: Optional[tuple[Sequence[float], Sequence[float]]] = None,
        axes: Optional[str] = None,
        level: int = 0,
        on_error: str = "raise",
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise UsageError(f"on_error {on_error!r} is unknown; use 'raise' or 'skip'")
        self.on_error = on_error
        self.source: ImageSource = open_image(image, axes=axes, level=level)
        self.geometry = Geometry.of(geometry)
        self.plan = TilePlan.build(self.source.shape, self.geometry, tile_size, chunk_size)
        pad_indices(0, 1, 1, padding)  # fail now on an unknown mode, not in a thread
        self.padding = padding
        self.scale, self.offset = normalization_affine(
            self.source.dtype, self.source.channels, normalization
        )

    def read(self, index: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Return the network input of tile `index`, shape ``(C, h_in, w_in)`` float32."""
        n_in = self.plan.input_size
        oy, ox = (int(v) - h for v, h in zip(self.plan.origins[index], self.geometry.halo))
        iy = pad_indices(oy, n_in[0], self.plan.shape[0], self.padding)
        ix = pad_indices(ox, n_in[1], self.plan.shape[1], self.padding)
        # Read only the bounding box of the source pixels the (mirrored) input uses.
        (y0, y1), (x0, x1) = _span(iy), _span(ix)
        region = self.source.read(y0, y1, x0, x1)
        if out is None:
            out = np.empty((self.source.channels, *n_in), dtype=np.float32)
        return gather(region, _shift(iy, y0), _shift(ix, x0), self.scale, self.offset, out)

    def batch(self, indices: Sequence[int], allocate: Optional[Allocator] = None) -> Batch:
        """Read the tiles `indices` into one `Batch`.

        `allocate(shape)` may supply the float32 array to fill (e.g. pinned
        memory for asynchronous device copies).
        """
        indices = np.asarray(indices, dtype=np.int64)
        shape = (len(indices), self.source.channels, *self.plan.input_size)
        data = np.empty(shape, np.float32) if allocate is None else allocate(shape)
        failed = []
        for k, index in enumerate(indices):
            try:
                self.read(int(index), out=data[k])
            except Exception as exc:
                oy, ox = (int(v) for v in self.plan.origins[index])
                if self.on_error == "raise":
                    raise TileReadError(
                        f"cannot read tile {int(index)} at (y, x) = ({oy}, {ox}) of {self.source.name}: "
                        f"{type(exc).__name__}: {exc}; the file may be corrupt there "
                        "(on_error='skip' / --on-error=skip fills such tiles and records them)"
                    ) from exc
                data[k] = 0
                failed.append(int(index))
        return Batch(indices, data, np.asarray(failed, np.int64))

    def batches(
        self,
        batch_size: int = 1,
        *,
        tiles: Optional[Sequence[int]] = None,
        prefetch: int = 2,
        workers: int = 2,
        allocate: Optional[Allocator] = None,
    ) -> Iterator[Batch]:
        """Yield batches of tile inputs in plan order, reading ahead in threads.

        Parameters
        ----------
        batch_size : int
            Tiles per batch (the last batch may be smaller).
        tiles : sequence of int, optional
            Plan indices to read (default: all); kept in the given order.
        prefetch : int
            Batches read ahead of the consumer; memory is
            ``(prefetch + 1) * batch`` inputs at most.
        workers : int
            Reader threads (0 reads in the calling thread). Decoding and the
            gather kernel release the GIL.
        allocate : callable, optional
            ``allocate(shape) -> float32 array`` for each batch's data.
        """
        if int(batch_size) < 1:
            raise UsageError(f"batch_size {batch_size} must be at least 1")
        order = np.arange(self.plan.n_tiles) if tiles is None else np.asarray(tiles, np.int64)
        groups = (order[i : i + int(batch_size)] for i in range(0, len(order), int(batch_size)))
        if workers <= 0:
            yield from (self.batch(g, allocate) for g in groups)
            return
        pool = ThreadPoolExecutor(workers, thread_name_prefix="tilesegment-read")
        pending: deque = deque()
        try:
            for group in groups:
                pending.append(pool.submit(self.batch, group, allocate))
                if len(pending) > prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Close the image file, if any."""
        self.source.close()

    def __enter__(self) -> "Tiler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _span(indices: np.ndarray) -> tuple[int, int]:
    inside = indices[indices >= 0]
    if inside.size == 0:
        return 0, 1
    return int(inside.min()), int(inside.max()) + 1


def _shift(indices: np.ndarray, start: int) -> np.ndarray:
    return np.where(indices >= 0, indices - start, -1)
