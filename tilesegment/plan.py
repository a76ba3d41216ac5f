"""Where every tile goes: origins on the network's step, grouped into chunk-aligned blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from .errors import InvalidTileSize
from .geometry import Geometry, Shape, ShapeLike, as_shape, axis_names, compact

__all__ = ["TilePlan", "Tile", "Block"]

#: Tiles a plan may have: its arrays take some 50 bytes a tile (13 GB at this
#: bound), and 2**28 tiles of the smallest sensible tile (16 px) cover 7e10 px,
#: more than the largest slides. Beyond it the shape is damaged or the tile too small.
MAX_TILES = 2**28


@dataclass(frozen=True)
class Tile:
    """One tile: the output pixels ``[origin, origin + size)`` and where its input starts."""

    index: int
    block: int
    origin: Shape
    size: Shape
    input_origin: Shape


@dataclass(frozen=True)
class Block:
    """A chunk-aligned region ``[start, stop)`` of the output and its tiles.

    A block is the smallest unit that is written: its chunks are complete once
    all of its tiles are in, so each chunk is written exactly once.
    """

    index: int
    start: Shape
    stop: Shape
    tiles: range


@dataclass(frozen=True, eq=False)
class TilePlan:
    """The overlap-tile plan of an image for a network.

    Tiles are ``tile_size`` output pixels on a grid whose origins are
    multiples of the tile size (hence of the step). Each tile's network input
    is ``geometry.input_size(tile_size)`` pixels starting at
    ``origin - halo``; the tile keeps the first ``tile_size`` output pixels,
    clipped at the far image edge. Tiles are ordered block by block (row-major
    blocks, row-major tiles inside), so a consumer that goes in plan order
    finishes one block before the next; the stack axes of a 2-d network over
    a stack (`Geometry.stack_axes`) go fastest among the blocks when the
    source's chunks are deeper than a tile along them (see `build`).

    Build with `TilePlan.build`.
    """

    shape: Shape
    geometry: Geometry
    tile_size: Shape
    chunk_size: Shape
    origins: np.ndarray  # (n_tiles, ndim) int64
    block_origins: np.ndarray  # (n_blocks, ndim) int64
    block_tiles: np.ndarray  # (n_blocks + 1,) int64: tiles of block b are [bt[b], bt[b+1])
    #: Names of the plan axes, slowest first: ``"yx"``, ``"zyx"``, ``"tyx"``...
    axes: str = ""

    def __post_init__(self) -> None:
        if not self.axes:
            object.__setattr__(self, "axes", axis_names(len(self.shape)))

    @classmethod
    def build(
        cls,
        shape: ShapeLike,
        geometry: Geometry,
        tile_size: ShapeLike,
        chunk_size: Optional[ShapeLike] = None,
        axes: Optional[str] = None,
        source_chunks: Optional[Sequence[int]] = None,
    ) -> "TilePlan":
        """Plan the tiles of an image of spatial `shape`.

        Parameters
        ----------
        shape : tuple of int
            Image size over the geometry's spatial axes: ``(Y, X)``, or
            ``(Z, Y, X)`` for a 3-D network.
        geometry : Geometry
            The network's geometry.
        tile_size : int or tuple of int
            Written tile edge; a positive multiple of ``geometry.step``.
        chunk_size : int or tuple of int, optional
            Output chunk edge. Must divide the tile size or be a multiple of
            it, per axis. Default: for images, the smallest multiple of the
            tile size that is at least 1024 (fewer, larger writes; viewers
            like ~1024 chunks); for volumes the tile size (a block then holds
            one tile, and memory stays small).
        axes : str, optional
            Names of the axes of `shape` (``"zyx"``, ``"tyx"``...), for
            messages and output metadata; default ``"yx"`` / ``"zyx"``.
        source_chunks : tuple of int, optional
            Edges of the chunks the image is stored in (`ImageSource.chunk_shape`).
            Where they are deeper than a tile along the stack axes of a 2-d
            network, those axes go fastest among the blocks, so that the
            planes of a chunk follow each other and it is decoded once for
            all of them; otherwise blocks are row-major.

        Notes
        -----
        A `shape` with more axes than the geometry is a stack of planes (or
        of volumes) for a network that sees one at a time: the geometry is
        `Geometry.stacked` over the leading axes, tiles are one plane deep
        there unless `tile_size` gives every axis, and chunks are as deep as
        the tiles.

        Raises
        ------
        InvalidTileSize
            If the tile size is not a multiple of the step or does not align
            with the chunk size.
        """
        shape = ((int(shape),) * geometry.ndim if isinstance(shape, (int, np.integer))
                 else tuple(int(n) for n in shape))
        if len(shape) < geometry.ndim:
            raise InvalidTileSize(
                f"image shape {shape} has fewer axes than the {geometry.ndim}-d network; "
                f"a {geometry.ndim}-d network needs {axis_names(geometry.ndim)} axes"
            )
        if len(shape) > geometry.ndim:  # a 2-d network over a Z/T stack
            geometry = geometry.stacked(len(shape) - geometry.ndim)
        ndim, stacked = geometry.ndim, geometry.stack_axes
        if stacked:  # tiles one plane deep along the stack unless asked
            tile_size = _with_stack(tile_size, stacked, ndim, 1)
            if chunk_size is not None:
                chunk_size = _with_stack(chunk_size, stacked, ndim, None)
        if min(shape) < 1:
            raise InvalidTileSize(f"image shape {shape} has no pixels")
        tile = geometry.check_tile_size(tile_size)
        if isinstance(chunk_size, tuple) and None in chunk_size:
            chunk_size = tuple(t if c is None else c for t, c in zip(tile, chunk_size))
        if chunk_size is None and ndim - stacked >= 3:
            chunk = tile
        elif chunk_size is None:
            # ~1024 px chunks in y and x; one tile deep along any slower axis (z, t).
            chunk = tuple(t * max(1, -(-1024 // t)) if a >= ndim - 2 else t for a, t in enumerate(tile))
        else:
            chunk = as_shape(chunk_size, ndim, "chunk_size")
        for t, c in zip(tile, chunk):
            if c < 1 or (t % c and c % t):
                raise InvalidTileSize(
                    f"chunk size {c} and tile size {t} are not aligned; use a chunk size that "
                    f"divides {t} or is a multiple of it (e.g. {t} or {2 * t})"
                )
        block = tuple(max(t, c) for t, c in zip(tile, chunk))
        n_blocks = tuple(-(-n // b) for n, b in zip(shape, block))
        per_block = tuple(b // t for b, t in zip(block, tile))
        n_tiles = math.prod(n_blocks) * math.prod(per_block)  # Python ints: no overflow
        if n_tiles > MAX_TILES:
            raise InvalidTileSize(
                f"image shape {shape} in tiles of {compact(tile)} makes {n_tiles:.3g} tiles, more than the "
                f"{MAX_TILES:.3g} a plan holds in memory; use a larger tile_size, or check the image's "
                "shape (a damaged file can claim an absurd one)"
            )
        # Blocks row-major, tiles row-major inside; stack axes go fastest among the blocks
        # when the source's chunks hold several of a tile's planes (see source_chunks).
        deep = source_chunks is not None and any(c > t for c, t in zip(source_chunks[:stacked], tile))
        order = list(range(stacked, ndim)) + list(range(stacked)) if deep else list(range(ndim))
        grid = np.meshgrid(*map(np.arange, n_blocks + per_block), indexing="ij")
        blocks, within = [g.ravel() for g in grid[:ndim]], [g.ravel() for g in grid[ndim:]]
        origins = np.stack([b * bs + w * t for b, w, bs, t in zip(blocks, within, block, tile)], axis=1)
        inside = (origins < np.asarray(shape)).all(axis=1)
        block_id = np.ravel_multi_index([blocks[a] for a in order], [n_blocks[a] for a in order])[inside]
        sort = np.argsort(block_id, kind="stable")
        counts = np.bincount(block_id, minlength=int(np.prod(n_blocks)))
        block_tiles = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        block_grid = np.meshgrid(*(np.arange(n_blocks[a]) for a in order), indexing="ij")
        block_origins = np.empty((block_grid[0].size, ndim), np.int64)
        for k, a in enumerate(order):
            block_origins[:, a] = block_grid[k].ravel() * block[a]
        if axes is not None and len(axes) != ndim:
            raise InvalidTileSize(f"axes {axes!r} do not name the {ndim} axes of shape {shape}")
        return cls(shape, geometry, tile, chunk, origins[inside][sort].astype(np.int64),
                   block_origins, block_tiles, (axes or "").lower())

    # -- sizes -----------------------------------------------------------------------

    @property
    def input_size(self) -> Shape:
        """Network input size of every tile."""
        return self.geometry.input_size(self.tile_size)

    @property
    def block_size(self) -> Shape:
        """Edge of a full block: the larger of tile and chunk size, per axis."""
        return tuple(max(t, c) for t, c in zip(self.tile_size, self.chunk_size))  # type: ignore[return-value]

    @property
    def n_tiles(self) -> int:
        return int(self.origins.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.block_origins.shape[0])

    def __len__(self) -> int:
        return self.n_tiles

    # -- items -----------------------------------------------------------------------

    def tile(self, index: int) -> Tile:
        """The `index`-th tile in plan order."""
        origin = tuple(int(v) for v in self.origins[index])
        block = int(np.searchsorted(self.block_tiles, index, side="right") - 1)
        size = tuple(min(t, n - o) for t, n, o in zip(self.tile_size, self.shape, origin))
        input_origin = tuple(o - h for o, h in zip(origin, self.geometry.halo))
        return Tile(int(index), block, origin, size, input_origin)

    def block(self, index: int) -> Block:
        """The `index`-th block; its tiles are consecutive in plan order."""
        start = tuple(int(v) for v in self.block_origins[index])
        stop = tuple(min(s + b, n) for s, b, n in zip(start, self.block_size, self.shape))
        tiles = range(int(self.block_tiles[index]), int(self.block_tiles[index + 1]))
        return Block(int(index), start, stop, tiles)

    def position(self, index: int) -> str:
        """Where tile `index` starts, for messages: ``"(y, x) = (512, 1024)"``."""
        origin = ", ".join(str(int(v)) for v in self.origins[index])
        names = ", ".join(self.axes)
        return f"({names}) = ({origin})"

    def tiles(self) -> Iterator[Tile]:
        """All tiles in plan order."""
        return (self.tile(i) for i in range(self.n_tiles))

    def blocks(self) -> Iterator[Block]:
        """All blocks in order."""
        return (self.block(b) for b in range(self.n_blocks))

    def tile_blocks(self) -> np.ndarray:
        """Block index of every tile, in plan order."""
        return np.repeat(np.arange(self.n_blocks), np.diff(self.block_tiles))

    def tiles_in(self, blocks) -> np.ndarray:
        """Per tile, whether its block is one of `blocks` (block indices or a boolean
        mask over blocks)."""
        blocks = np.asarray(blocks)
        mask = blocks if blocks.dtype == bool else np.isin(np.arange(self.n_blocks), blocks)
        return np.repeat(mask, np.diff(self.block_tiles))

    def tiles_touching(self, mask: np.ndarray, margin: Optional[ShapeLike] = None) -> np.ndarray:
        """Which tiles overlap a True pixel of `mask` within `margin` pixels of their own area.

        `mask` covers the whole image at any resolution (scaled by shape).
        A tile's area is ``[origin - margin, origin + tile_size + margin)``,
        clipped to the image. The default margin is the halo: the tile's
        whole network input (mirrored pixels are image pixels near the edge).
        ``margin=0`` asks whether the tile's own pixels touch the mask.
        """
        mask = np.asarray(mask, dtype=bool)
        if self.geometry.ndim != 2 or mask.ndim != 2:
            raise InvalidTileSize(
                f"tissue masks are 2-d (Y, X) over a 2-d plan; got a {mask.ndim}-d mask for a "
                f"{self.geometry.ndim}-d plan"
            )
        (my, mx), (ny, nx) = mask.shape, self.shape
        table = np.zeros((my + 1, mx + 1), np.int64)
        table[1:, 1:] = mask.cumsum(0).cumsum(1)
        margin = np.asarray(self.geometry.halo if margin is None else as_shape(margin, self.geometry.ndim, "margin"))
        start = self.origins - margin
        stop = self.origins + np.asarray(self.tile_size) + margin
        y0 = np.clip(np.floor(np.clip(start[:, 0], 0, ny) * my / ny), 0, my - 1).astype(np.int64)
        x0 = np.clip(np.floor(np.clip(start[:, 1], 0, nx) * mx / nx), 0, mx - 1).astype(np.int64)
        y1 = np.clip(np.ceil(np.clip(stop[:, 0], 0, ny) * my / ny), y0 + 1, my).astype(np.int64)
        x1 = np.clip(np.ceil(np.clip(stop[:, 1], 0, nx) * mx / nx), x0 + 1, mx).astype(np.int64)
        inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
        return inside > 0

    def computed_fraction(self) -> float:
        """Network input pixels computed per output pixel written (the halo overhead)."""
        return self.n_tiles * int(np.prod(self.input_size)) / int(np.prod(self.shape))


def _with_stack(value: ShapeLike, stack: int, ndim: int, fill) -> tuple:
    """`value` over all `ndim` plan axes: as given when it names each, else `fill` on
    the `stack` leading axes and `value` on the network's."""
    if not isinstance(value, (int, np.integer)) and len(tuple(value)) == ndim:
        return tuple(value)
    return (fill,) * stack + as_shape(value, ndim - stack, "tile size")
