"""Outlines of labelled objects as exact pixel-edge polygons, chunk by chunk (private).

A pixel (y, x) is the unit square [x, x+1] x [y, y+1] (QuPath's and
shapely's convention for full-resolution pixel coordinates). A numba kernel
walks the pixel edges between each object and the rest of the chunk into
rings (exterior and holes), so the outline's area is exactly the pixel count. An object that crosses chunks is the union of
its pieces, made once the last chunk its box touches has been read, so memory
holds only the outlines of objects still open.
"""

from __future__ import annotations

from typing import Any, Iterator

import numba
import numpy as np

from ._components import Grid

__all__ = ["chunk_pieces", "iter_outlines"]


# Directions of a boundary step: 0 down (+y), 1 right (+x), 2 up (-y), 3 left (-x).
_DY = np.array([1, 0, -1, 0], np.int64)
_DX = np.array([0, 1, 0, -1], np.int64)


@numba.njit(cache=True, nogil=True, inline="always")
def _at(lab, y, x):  # pragma: no cover - compiled
    if y < 0 or x < 0 or y >= lab.shape[0] or x >= lab.shape[1]:
        return 0
    return lab[y, x]


@numba.njit(cache=True, nogil=True)
def _edge(lab, y, x, d, v):  # pragma: no cover - compiled
    """Whether a boundary step of object v leaves vertex (y, x) in direction d (v on its left)."""
    nw, ne, sw, se = _at(lab, y - 1, x - 1), _at(lab, y - 1, x), _at(lab, y, x - 1), _at(lab, y, x)
    if d == 0:
        return se == v and sw != v
    if d == 1:
        return ne == v and se != v
    if d == 2:
        return nw == v and ne != v
    return sw == v and nw != v


@numba.njit(cache=True, nogil=True)
def _trace(lab):  # pragma: no cover - compiled
    """Every boundary ring of every object in `lab`, following pixel edges.

    `lab` holds face-connected regions (`_regions`). Each pixel side between
    a region and anything else is one step, with the region on its left; at
    a vertex where two diagonal pixels of one region meet, the ring turns
    right (joins them): they are face-connected elsewhere, so this keeps
    every ring simple. Only corners (and vertices on the chunk border) are kept.
    Returns the object of each ring, ring offsets into the vertex arrays, and
    the vertices (x, y).
    """
    h, w = lab.shape
    n_edges = 0
    for y in range(h):
        for x in range(w):
            v = lab[y, x]
            if v != 0:
                n_edges += (_at(lab, y, x - 1) != v) + (_at(lab, y + 1, x) != v) + (_at(lab, y, x + 1) != v) \
                    + (_at(lab, y - 1, x) != v)
    used = np.zeros((h + 1, w + 1, 4), np.bool_)
    xs = np.empty(n_edges + 1, np.int64)
    ys = np.empty(n_edges + 1, np.int64)
    owner = np.empty(n_edges + 1, np.int64)
    offsets = np.empty(n_edges + 2, np.int64)
    k, r = 0, 0
    offsets[0] = 0
    for py in range(h):
        for px in range(w):
            v = lab[py, px]
            if v == 0:
                continue
            # the four sides of the pixel as (start vertex, direction): left, bottom, right, top
            for side in range(4):
                if side == 0:
                    y0, x0, d0 = py, px, 0
                elif side == 1:
                    y0, x0, d0 = py + 1, px, 1
                elif side == 2:
                    y0, x0, d0 = py + 1, px + 1, 2
                else:
                    y0, x0, d0 = py, px + 1, 3
                if used[y0, x0, d0] or not _edge(lab, y0, x0, d0, v):
                    continue
                y, x, d, prev = y0, x0, d0, -1
                first = k
                while True:
                    # corners, and every vertex on the chunk's border, where pieces of an object
                    # from two chunks must share their vertices to be joined as a coverage
                    if d != prev or y == 0 or x == 0 or y == h or x == w:
                        xs[k], ys[k] = x, y
                        k += 1
                    used[y, x, d] = True
                    y += _DY[d]
                    x += _DX[d]
                    prev = d
                    for turn in (3, 0, 1):  # right turn, straight on, left turn
                        nd = (d + turn) % 4
                        if _edge(lab, y, x, nd, v):
                            d = nd
                            break
                    if y == y0 and x == x0 and d == d0:
                        break
                if prev == d0 and k - first > 1:  # the start vertex lies on a straight side
                    xs[first] = xs[k - 1]
                    ys[first] = ys[k - 1]
                    k -= 1
                owner[r] = v
                r += 1
                offsets[r] = k
    return owner[:r], offsets[: r + 1], xs[:k], ys[:k]


@numba.njit(cache=True, nogil=True)
def _find(parent, i):  # pragma: no cover - compiled
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@numba.njit(cache=True, nogil=True)
def _regions(lab):  # pragma: no cover - compiled
    """Face-connected regions of equal non-zero value, numbered 1..n in raster order."""
    h, w = lab.shape
    parent = np.arange(h * w)
    for y in range(h):
        for x in range(w):
            v = lab[y, x]
            if v == 0:
                continue
            i = y * w + x
            if x > 0 and lab[y, x - 1] == v:
                a, b = _find(parent, i), _find(parent, i - 1)
                parent[max(a, b)] = min(a, b)
            if y > 0 and lab[y - 1, x] == v:
                a, b = _find(parent, i), _find(parent, i - w)
                parent[max(a, b)] = min(a, b)
    out = np.zeros((h, w), np.int64)
    number = np.zeros(h * w, np.int64)
    n = 0
    for y in range(h):
        for x in range(w):
            if lab[y, x] == 0:
                continue
            root = _find(parent, y * w + x)
            if number[root] == 0:
                n += 1
                number[root] = n
            out[y, x] = number[root]
    return out


def chunk_pieces(lab: np.ndarray, y0: int, x0: int) -> dict[int, Any]:
    """The outline of every object in the 2-D chunk `lab` whose first pixel is at (y0, x0).

    Each face-connected region of one object is traced on its own: it has
    one exterior ring (negative shoelace area: the object is on the left of
    every step) and its holes. Regions of one object (cut apart by the chunk
    border, or joined only diagonally) touch at most at corners and form a
    MultiPolygon.
    """
    import shapely

    lab = np.ascontiguousarray(lab)
    regions = _regions(lab)
    region_of, offsets, xs, ys = _trace(regions)
    if len(region_of) == 0:
        return {}
    xs, ys = xs + x0, ys + y0
    # shoelace area of every ring at once (closing vertex = the ring's first)
    nxt = np.arange(1, len(xs) + 1)
    nxt[offsets[1:] - 1] = offsets[:-1]
    twice = np.add.reduceat(xs * ys[nxt] - xs[nxt] * ys, offsets[:-1])
    rings = shapely.linearrings(np.stack([xs, ys], 1), indices=np.repeat(np.arange(len(region_of)), np.diff(offsets)))
    # the object of each region: the value under its first pixel (rings start on a pixel of theirs)
    first = np.zeros(int(region_of.max()) + 1, np.int64)
    flat = regions.ravel()
    first[flat[::-1]] = np.arange(flat.size)[::-1]
    object_of = lab.ravel()[first]
    order = np.lexsort((twice >= 0, region_of))  # per region: its exterior, then its holes
    cuts = np.flatnonzero(np.diff(region_of[order])) + 1
    parts: dict[int, list] = {}
    for group in np.split(order, cuts):
        region = int(region_of[group[0]])
        parts.setdefault(int(object_of[region]), []).append(shapely.Polygon(rings[group[0]], rings[group[1:]]))
    return {oid: p[0] if len(p) == 1 else shapely.MultiPolygon(p) for oid, p in parts.items()}


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
                yield oid, _orient(shapely.simplify(piece, 0.0))
            else:
                open_pieces.setdefault(oid, []).append(piece)
        done = [oid for oid in open_pieces if last[oid - 1] == flat]
        for oid in sorted(done):
            # pieces meet edge to edge, with the same vertices along chunk borders: a coverage,
            # whose union only drops the shared edges (far faster than a general union)
            yield oid, _orient(shapely.simplify(shapely.coverage_union_all(open_pieces.pop(oid)), 0.0))
    if open_pieces:  # cannot happen with consistent boxes
        raise RuntimeError(f"{len(open_pieces)} object outlines were never closed")


def _orient(geometry: Any) -> Any:
    """Exterior counter-clockwise, holes clockwise (RFC 7946)."""
    import shapely

    return shapely.orient_polygons(geometry) if hasattr(shapely, "orient_polygons") else geometry
