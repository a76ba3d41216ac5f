"""Outlines of labelled objects as exact pixel-edge polygons, chunk by chunk (private).

A pixel (y, x) is the unit square [x, x+1] x [y, y+1] (QuPath's and
shapely's convention for full-resolution pixel coordinates). Each row of a
chunk is cut into runs of one object id; the runs of an object are unit-height
boxes whose union (shapely/GEOS) is the object's outline with its holes, its
area exactly the pixel count. An object that crosses chunks is the union of
its pieces, made once the last chunk its box touches has been read, so memory
holds only the outlines of objects still open.
"""

from __future__ import annotations

from typing import Any, Iterator

import numba
import numpy as np

from ._components import Grid

__all__ = ["row_runs", "chunk_pieces", "iter_outlines"]


@numba.njit(cache=True, nogil=True)
def _runs(lab):  # pragma: no cover - compiled
    n = 0
    for y in range(lab.shape[0]):
        for x in range(lab.shape[1]):
            v = lab[y, x]
            if v != 0 and (x == 0 or lab[y, x - 1] != v):
                n += 1
    ids = np.empty(n, np.int64)
    ys = np.empty(n, np.int64)
    x0 = np.empty(n, np.int64)
    x1 = np.empty(n, np.int64)
    k = -1
    for y in range(lab.shape[0]):
        for x in range(lab.shape[1]):
            v = lab[y, x]
            if v == 0:
                continue
            if x == 0 or lab[y, x - 1] != v:
                k += 1
                ids[k], ys[k], x0[k] = v, y, x
            x1[k] = x + 1
    return ids, ys, x0, x1


def row_runs(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal non-zero ids along each row: (id, y, x start, x stop)."""
    return _runs(np.ascontiguousarray(lab))


def chunk_pieces(lab: np.ndarray, y0: int, x0: int) -> dict[int, Any]:
    """The outline of every object in the 2-D chunk `lab` whose first pixel is at (y0, x0)."""
    import shapely

    ids, ys, xs0, xs1 = row_runs(lab)
    if len(ids) == 0:
        return {}
    order = np.argsort(ids, kind="stable")
    ids, ys, xs0, xs1 = ids[order], ys[order] + y0, xs0[order] + x0, xs1[order] + x0
    boxes = shapely.box(xs0, ys, xs1, ys + 1)
    cuts = np.flatnonzero(np.diff(ids)) + 1
    pieces = {}
    for start, stop in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(ids)]])):
        pieces[int(ids[start])] = shapely.union_all(boxes[start:stop])
    return pieces


def iter_outlines(labels: Any, grid: Grid, hi: np.ndarray) -> Iterator[tuple[int, Any]]:
    """Yield ``(id, polygon)`` for every object of the 2-D `labels`, chunk by chunk.

    `grid` is a 3-D grid with one chunk along its first axis; `hi` the
    exclusive (y, x) box end of object ``id`` at row ``id - 1``. An object is
    yielded after the last chunk its box touches.
    """
    import shapely

    open_pieces: dict[int, list] = {}
    # the chunk (in raster order) after which each object is complete
    last_y = np.searchsorted(np.asarray(grid.edges[1]), hi[:, 0] - 1, side="right") - 1
    last_x = np.searchsorted(np.asarray(grid.edges[2]), hi[:, 1] - 1, side="right") - 1
    last = last_y * grid.counts[2] + last_x
    for flat in range(grid.n_chunks):
        region = grid.region(flat)
        block = np.asarray(labels[region[1:]])
        pieces = chunk_pieces(block, region[1].start, region[2].start)
        for oid, piece in pieces.items():
            if last[oid - 1] == flat and oid not in open_pieces:
                yield oid, _tidy(piece)
            else:
                open_pieces.setdefault(oid, []).append(piece)
        done = [oid for oid in open_pieces if last[oid - 1] == flat]
        for oid in sorted(done):
            yield oid, _tidy(shapely.union_all(open_pieces.pop(oid)))
    if open_pieces:  # cannot happen with consistent boxes
        raise RuntimeError(f"{len(open_pieces)} object outlines were never closed")


def _tidy(geometry: Any) -> Any:
    """Drop collinear vertices; exterior counter-clockwise, holes clockwise (RFC 7946)."""
    import shapely

    geometry = shapely.simplify(geometry, 0.0)
    return shapely.orient_polygons(geometry) if hasattr(shapely, "orient_polygons") else geometry
