"""Connected components chunk by chunk, joined across chunk faces (private).

Every array here is 3-D: a 2-D map is handled as a (1, Y, X) volume, which
changes nothing (there is no neighbour along the added axis) and keeps one
code path for slides and volumes.

A chunk is labelled on its own (`label_chunk`: ``scipy.ndimage.label`` per
class, so components of different classes never meet), measured in one numba
pass (`chunk_stats`), and keeps only its *shell*, the first and last plane
along each axis. `Merger` joins the components of neighbouring chunks from
their shells: for each pair of chunks that touch (across a face, and across an
edge or corner when the connectivity reaches diagonally) it pairs the pixels
of the two shells that are neighbours under the structuring element. Shells
are dropped as soon as all their neighbours are in, so memory holds about one
band of chunks' shells plus per-component numbers (a table that grows with the
number of objects, never with the number of pixels). `Merger.finish` runs the
union (connected components of the small graph of chunk-local components)
and numbers objects 1..N by their first pixel in raster order.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import numba
import numpy as np

__all__ = ["Grid", "ChunkResult", "Merger", "Tally", "label_chunk", "chunk_stats", "structure", "measure_chunk",
           "measure_ids", "object_ids"]


@dataclass(frozen=True)
class Grid:
    """A rectilinear chunk grid over a 3-D shape: chunk edges per axis."""

    shape: tuple[int, int, int]
    edges: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

    @classmethod
    def regular(cls, shape: Sequence[int], chunks: Sequence[int]) -> "Grid":
        return cls(tuple(int(n) for n in shape),
                   tuple(tuple(range(0, n, max(1, c))) + (n,) for n, c in zip(shape, chunks)))

    @classmethod
    def from_sizes(cls, shape: Sequence[int], sizes: Sequence[Sequence[int]]) -> "Grid":
        """From per-axis chunk sizes, as in ``dask.array.Array.chunks``."""
        return cls(tuple(int(n) for n in shape),
                   tuple(tuple(int(e) for e in np.concatenate([[0], np.cumsum(s)])) for s in sizes))

    @property
    def counts(self) -> tuple[int, int, int]:
        return tuple(len(e) - 1 for e in self.edges)

    @property
    def n_chunks(self) -> int:
        return int(np.prod(self.counts))

    def index(self, flat: int) -> tuple[int, int, int]:
        return tuple(int(i) for i in np.unravel_index(flat, self.counts))

    def flat(self, index: Sequence[int]) -> int:
        return int(np.ravel_multi_index(tuple(index), self.counts))

    def region(self, flat: int) -> tuple[slice, slice, slice]:
        return tuple(slice(e[i], e[i + 1]) for e, i in zip(self.edges, self.index(flat)))

    def chunk_of(self, point: Sequence[int]) -> tuple[int, int, int]:
        """Index of the chunk that holds `point`."""
        return tuple(int(np.searchsorted(e, p, side="right")) - 1 for e, p in zip(self.edges, point))


def structure(connectivity: int) -> np.ndarray:
    """The 3x3x3 structuring element of `connectivity` (1: faces ... 3: all neighbours)."""
    from scipy import ndimage

    return ndimage.generate_binary_structure(3, connectivity)


def label_chunk(labels: np.ndarray, classes: Sequence[int], connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of each class in `labels` (3-D), numbered 1..n across classes.

    Returns the int32 component map and the class of each component
    (index 0, the background, has class -1).
    """
    from scipy import ndimage

    local = None
    class_of = [np.full(1, -1, np.int64)]
    n = 0
    element = structure(connectivity)
    for k in classes:
        mask = labels == k
        lab, m = ndimage.label(mask, element, output=np.int32)
        if not m:
            continue
        if local is None:  # the first class with components: its map is the start (no copy)
            local = lab
        else:
            np.add(lab, n, out=local, where=mask)
        class_of.append(np.full(m, k, np.int64))
        n += m
    return (np.zeros(labels.shape, np.int32) if local is None else local), np.concatenate(class_of)


@numba.njit(cache=True, nogil=True)
def _stats(local, base, n, origin, gshape, prob, has_prob, cls, n_cls):  # pragma: no cover - compiled
    area = np.zeros(n + 1, np.int64)
    sums = np.zeros((n + 1, 3), np.int64)
    lo = np.full((n + 1, 3), np.iinfo(np.int64).max, np.int64)
    hi = np.full((n + 1, 3), -1, np.int64)
    first = np.full(n + 1, -1, np.int64)
    psum = np.zeros(n + 1, np.float64)
    votes = np.zeros((n + 1, n_cls), np.int64)
    oz, oy, ox = origin[0], origin[1], origin[2]
    for z in range(local.shape[0]):
        for y in range(local.shape[1]):
            for x in range(local.shape[2]):
                v = np.int64(local[z, y, x])
                if v == 0:
                    continue
                v -= base
                gz, gy, gx = oz + z, oy + y, ox + x
                area[v] += 1
                sums[v, 0] += gz
                sums[v, 1] += gy
                sums[v, 2] += gx
                if first[v] < 0:  # raster order in the chunk is raster order in the image
                    first[v] = (gz * gshape[1] + gy) * gshape[2] + gx
                    lo[v, 0], lo[v, 1], lo[v, 2] = gz, gy, gx
                lo[v, 1] = min(lo[v, 1], gy)
                lo[v, 2] = min(lo[v, 2], gx)
                hi[v, 0] = gz  # z only grows in raster order
                hi[v, 1] = max(hi[v, 1], gy)
                hi[v, 2] = max(hi[v, 2], gx)
                if has_prob:
                    psum[v] += prob[z, y, x]
                if n_cls:
                    votes[v, cls[z, y, x]] += 1
    return area, sums, lo, hi, first, psum, votes


_NO_CLASSES = np.zeros((1, 1, 1), np.uint8)


def chunk_stats(local: np.ndarray, n: int, origin: Sequence[int], shape: Sequence[int],
                prob: Optional[np.ndarray], base: int = 0, classes: Optional[np.ndarray] = None) -> dict:
    """Per component of `local` (values ``base + 1 .. base + n``): pixel count, coordinate sums,
    box, first pixel, probability sum, and pixels per class of `classes` (the class map).

    Coordinates are in the whole image (`origin` is the chunk's first pixel,
    `shape` the image's); ``first`` is the raster index of the component's
    first pixel; the box's ``hi`` is inclusive.
    """
    has = prob is not None
    p = np.ascontiguousarray(prob, np.float32) if has else np.zeros((1, 1, 1), np.float32)
    n_cls = 0 if classes is None or classes.size == 0 else int(classes.max()) + 1
    cls = np.ascontiguousarray(classes) if n_cls else _NO_CLASSES
    area, sums, lo, hi, first, psum, votes = _stats(
        np.ascontiguousarray(local), int(base), int(n), np.asarray(origin, np.int64),
        np.asarray(shape, np.int64), p, has, cls, n_cls)
    out = {"area": area[1:], "sums": sums[1:], "lo": lo[1:], "hi": hi[1:], "first": first[1:]}
    if has:
        out["psum"] = psum[1:]
    if classes is not None:
        out["votes"] = votes[1:]
    return out


@dataclass
class ChunkResult:
    """What the merge needs from one labelled chunk: per-component numbers and the shell."""

    index: int
    n: int
    classes: np.ndarray  # (n,) class of each component
    stats: dict  # per-component arrays, see chunk_stats
    shell: list  # per axis: (first plane, last plane) of the component map


def measure_chunk(index: int, grid: Grid, labels: np.ndarray, prob: Optional[np.ndarray],
                  classes: Sequence[int], connectivity: int) -> tuple[ChunkResult, np.ndarray]:
    """Label and measure chunk `index`; return its result and its component map."""
    local, class_of = label_chunk(labels, classes, connectivity)
    n = len(class_of) - 1
    origin = [r.start for r in grid.region(index)]
    stats = chunk_stats(local, n, origin, grid.shape, prob)
    # keep only the planes that face a neighbouring chunk: a 2-D map is one chunk deep, and
    # its whole chunk would otherwise be kept twice as the "planes" of the leading axis
    at, counts = grid.index(index), grid.counts
    shell = [(np.take(local, 0, axis=a).copy() if at[a] > 0 else None,
              np.take(local, -1, axis=a).copy() if at[a] < counts[a] - 1 else None) for a in range(3)]
    return ChunkResult(index, n, class_of[1:], stats, shell), local


def _directions(connectivity: int) -> list[tuple[int, int, int]]:
    """Chunk neighbour directions D with D > 0 lexicographically that pixels can cross."""
    out = []
    for d in itertools.product((-1, 0, 1), repeat=3):
        nonzero = [v for v in d if v]
        if nonzero and nonzero[0] > 0 and len(nonzero) <= connectivity:
            out.append(d)
    return out


def _side(shell: list, direction: Sequence[int]) -> np.ndarray:
    """The part of a chunk's shell facing `direction` (last plane for +1, first for -1),
    with the axes where the direction is 0 kept whole (in their order)."""
    axes = [a for a, d in enumerate(direction) if d]
    a0 = axes[0]
    part = shell[a0][1 if direction[a0] > 0 else 0]
    # `part` lost axis a0; further constrained axes index into it.
    for a in axes[1:]:
        b = a - 1  # axes after a0 move down by one
        removed = sum(1 for x in axes[1:] if x < a)
        part = np.take(part, -1 if direction[a] > 0 else 0, axis=b - removed)
    return part


def face_pairs(shell_a: list, shell_b: list, direction: Sequence[int], connectivity: int,
               class_a: np.ndarray, class_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Components of chunk a and of its neighbour b (at `direction`) that touch: local id pairs."""
    a = _side(shell_a, direction)
    b = _side(shell_b, tuple(-d for d in direction))
    fixed = sum(1 for d in direction if d)
    free = a.ndim
    found_a, found_b = [], []
    for shift in itertools.product((-1, 0, 1), repeat=free):
        if fixed + sum(1 for s in shift if s) > connectivity:
            continue
        sa = tuple(slice(0, n - 1) if s > 0 else slice(1, n) if s < 0 else slice(None)
                   for s, n in zip(shift, a.shape))
        sb = tuple(slice(1, n) if s > 0 else slice(0, n - 1) if s < 0 else slice(None)
                   for s, n in zip(shift, b.shape))
        va, vb = a[sa].ravel(), b[sb].ravel()
        hit = (va != 0) & (vb != 0)
        va, vb = va[hit], vb[hit]
        same = class_a[va - 1] == class_b[vb - 1]
        found_a.append(va[same])
        found_b.append(vb[same])
    if not found_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    va, vb = np.concatenate(found_a).astype(np.int64), np.concatenate(found_b).astype(np.int64)
    if len(va) > 1:  # many pixels of the same two components touch: keep each pair once
        base = int(vb.max()) + 1
        key = np.unique(va * base + vb)
        va, vb = key // base, key % base
    return va, vb


@dataclass(frozen=True)
class Merged:
    """The objects: per chunk a lookup table local id -> object id, and per-object numbers."""

    lookups: list  # per chunk: array (n_c + 1,) with 0 -> 0
    n_objects: int
    classes: np.ndarray
    area: np.ndarray
    centroid: np.ndarray  # (N, 3) float64
    lo: np.ndarray  # (N, 3) inclusive
    hi: np.ndarray  # (N, 3) exclusive
    mean_probability: Optional[np.ndarray]
    votes: Optional[np.ndarray] = None  # (N, C) pixels of each class value, when measured after steps


class Merger:
    """Joins chunk results (in any order) across chunk faces; `finish` numbers the objects."""

    def __init__(self, grid: Grid, connectivity: int) -> None:
        self.grid, self.connectivity = grid, connectivity
        self.directions = _directions(connectivity)
        self.results: dict[int, ChunkResult] = {}
        self._waiting = {}  # chunk -> neighbours not yet in
        self._pairs: list[tuple[int, np.ndarray, int, np.ndarray]] = []

    def _neighbours(self, flat: int):
        index = self.grid.index(flat)
        counts = self.grid.counts
        for d in self.directions:
            for sign in (1, -1):
                j = tuple(i + sign * v for i, v in zip(index, d))
                if all(0 <= v < c for v, c in zip(j, counts)):
                    yield self.grid.flat(j), tuple(sign * v for v in d)

    def add(self, result: ChunkResult) -> None:
        """Take one chunk's result; join it with the neighbours already in."""
        flat = result.index
        self.results[flat] = result
        self._waiting[flat] = 0
        for other, d in self._neighbours(flat):
            theirs = self.results.get(other)
            if theirs is None:
                self._waiting[flat] += 1
                continue
            if result.n and theirs.n:
                la, lb = face_pairs(result.shell, theirs.shell, d, self.connectivity, result.classes, theirs.classes)
                if len(la):
                    self._pairs.append((flat, la, other, lb))
            self._waiting[other] -= 1
            if self._waiting[other] == 0:
                theirs.shell = None  # every neighbour is in: the shell is no longer needed
        if self._waiting[flat] == 0:
            result.shell = None

    def finish(self) -> Merged:
        """Union the touching components; number objects 1..N by first pixel in raster order."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        order = sorted(self.results)
        if len(order) != self.grid.n_chunks:
            raise RuntimeError(f"{self.grid.n_chunks - len(order)} chunks were never labelled")
        counts = np.array([self.results[i].n for i in order], np.int64)
        offset = np.concatenate([[0], np.cumsum(counts)])
        total = int(offset[-1])

        def cat(key):
            return np.concatenate([self.results[i].stats[key] for i in order]) if total else None

        if self._pairs:
            a = np.concatenate([offset[fa] + la - 1 for fa, la, _, _ in self._pairs])
            b = np.concatenate([offset[fb] + lb - 1 for _, _, fb, lb in self._pairs])
        else:
            a = b = np.zeros(0, np.int64)
        graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(total, total))
        n_comp, comp = connected_components(graph, directed=False)
        if total == 0:
            none = np.zeros(0, np.int64)
            box = np.zeros((0, 3), np.int64)
            return Merged([np.zeros(1, np.uint32) for _ in order], 0, none, none,
                          box.astype(np.float64), box, box, None)
        first = np.full(n_comp, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(first, comp, cat("first"))
        rank = np.empty(n_comp, np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(n_comp)
        ids = rank[comp]  # 0-based object number of every chunk-local component
        dtype = np.uint32 if n_comp < 2**32 - 1 else np.uint64
        area = np.bincount(ids, cat("area"), minlength=n_comp).astype(np.int64)
        sums = np.stack([np.bincount(ids, cat("sums")[:, k].astype(np.float64), minlength=n_comp)
                         for k in range(3)], axis=1)
        lo = np.full((n_comp, 3), np.iinfo(np.int64).max, np.int64)
        hi = np.full((n_comp, 3), -1, np.int64)
        np.minimum.at(lo, ids, cat("lo"))
        np.maximum.at(hi, ids, cat("hi"))
        classes = np.zeros(n_comp, np.int64)
        classes[ids] = np.concatenate([self.results[i].classes for i in order])
        mean_p = None
        if "psum" in self.results[order[0]].stats:
            mean_p = np.bincount(ids, cat("psum"), minlength=n_comp) / np.maximum(area, 1)
        lookups = [np.concatenate([[0], ids[offset[k]:offset[k + 1]] + 1]).astype(dtype)
                   for k in range(len(order))]
        return Merged(lookups, n_comp, classes, area, sums / area[:, None], lo, hi + 1, mean_p)


@numba.njit(cache=True, nogil=True)
def _id_range(ids):  # pragma: no cover - compiled
    lo, hi = np.int64(-1), np.int64(-1)
    for v in ids.ravel():
        if v != 0:
            w = np.int64(v)
            if lo < 0 or w < lo:
                lo = w
            if w > hi:
                hi = w
    return lo, hi


def measure_ids(ids: np.ndarray, origin: Sequence[int], shape: Sequence[int], prob: Optional[np.ndarray],
                classes: np.ndarray) -> dict:
    """The numbers of every object in a chunk of object ids (3-D; ids global, any values).

    Returns `chunk_stats`' arrays for the ids present, and ``ids``, the id of each row.
    """
    lo, hi = _id_range(ids)
    if lo < 0:
        return {"ids": np.zeros(0, np.int64)}
    if hi - lo < 4 * ids.size + 1024:  # ids of a chunk are near each other (raster numbering)
        stats = chunk_stats(ids, int(hi - lo + 1), origin, shape, prob, base=int(lo) - 1, classes=classes)
        rows = np.arange(lo, hi + 1, dtype=np.int64)
    else:  # scattered ids (a step's own numbering): count them apart
        rows, local = np.unique(ids, return_inverse=True)
        local = local.reshape(ids.shape).astype(np.int64)
        if rows[0] == 0:
            rows = rows[1:]
        else:
            local += 1
        stats = chunk_stats(local, len(rows), origin, shape, prob, classes=classes)
        rows = rows.astype(np.int64)
    present = stats["area"] > 0
    return {"ids": rows[present], **{k: v[present] for k, v in stats.items()}}


class Tally:
    """Sums `measure_ids` results of any chunks, in any order, into per-object numbers."""

    def __init__(self) -> None:
        self.n = 0
        self.area = np.zeros(0, np.int64)
        self.sums = np.zeros((0, 3), np.int64)
        self.lo = np.zeros((0, 3), np.int64)
        self.hi = np.zeros((0, 3), np.int64)
        self.psum: Optional[np.ndarray] = None
        self.votes = np.zeros((0, 0), np.int64)

    def _reserve(self, n: int, n_cls: int) -> None:
        if n > len(self.area) or n_cls > self.votes.shape[1]:
            size = max(n, 2 * len(self.area)) if n > len(self.area) else len(self.area)

            def grown(a, fill, cols=None):
                out = np.full((size,) + a.shape[1:] if cols is None else (size, cols), fill, a.dtype)
                out[tuple(slice(0, m) for m in a.shape)] = a
                return out

            self.area, self.sums = grown(self.area, 0), grown(self.sums, 0)
            self.lo, self.hi = grown(self.lo, np.iinfo(np.int64).max), grown(self.hi, -1)
            self.votes = grown(self.votes, 0, max(n_cls, self.votes.shape[1]))
            if self.psum is not None:
                self.psum = grown(self.psum, 0.0)
        self.n = max(self.n, n)

    def add(self, part: dict) -> None:
        ids = part["ids"]
        if not len(ids):
            return
        votes = part.get("votes")
        self._reserve(int(ids.max()), 0 if votes is None else votes.shape[1])
        if "psum" in part and self.psum is None:
            self.psum = np.zeros(len(self.area), np.float64)
        at = ids - 1  # ids are distinct within a part
        self.area[at] += part["area"]
        self.sums[at] += part["sums"]
        self.lo[at] = np.minimum(self.lo[at], part["lo"])
        self.hi[at] = np.maximum(self.hi[at], part["hi"])
        if votes is not None:
            self.votes[at, :votes.shape[1]] += votes
        if "psum" in part:
            self.psum[at] += part["psum"]

    def finish(self, classes: np.ndarray) -> Merged:
        """Per-object numbers of ids 1..max; an id of none has area 0. `classes` is the class of
        ids 1..len(classes) (the seeds'); a larger id takes its most frequent class."""
        n = self.n
        area = self.area[:n]
        votes = self.votes[:n]
        cls = np.full(n, -1, np.int64)
        known = min(n, len(classes))
        cls[:known] = classes[:known]
        if n > known and votes.shape[1]:
            cls[known:] = np.argmax(votes[known:], axis=1)
        mean_p = None if self.psum is None else self.psum[:n] / np.maximum(area, 1)
        return Merged([], n, cls, area, self.sums[:n] / np.maximum(area, 1)[:, None], self.lo[:n],
                      self.hi[:n] + 1, mean_p, votes if votes.shape[1] else None)


@numba.njit(cache=True, nogil=True)
def _object_ids(local, lookup, labels, into, mark, out):  # pragma: no cover - compiled
    for i in range(local.size):
        v = local[i]
        if v != 0:
            out[i] = lookup[v]
        elif into.size and labels[i] < into.size and into[labels[i]]:
            out[i] = mark
        else:
            out[i] = 0
    return out


def object_ids(local: np.ndarray, lookup: np.ndarray, labels: np.ndarray, grow_into: Sequence[int] = ()) -> np.ndarray:
    """``lookup[local]`` (chunk-local components to object ids) without holding the GIL; pixels
    outside the objects whose class is in `grow_into` get the dtype's largest value (to grow into)."""
    into = np.zeros(max(grow_into, default=-1) + 1, np.bool_)
    into[list(grow_into)] = True
    flat = np.ascontiguousarray(labels).reshape(-1)
    if flat.dtype.kind != "u":  # a signed class map: its negative values are grown into by no one
        flat = np.where(flat < 0, into.size, flat).astype(np.uint64)
    out = np.empty(local.size, lookup.dtype)
    mark = lookup.dtype.type(np.iinfo(lookup.dtype).max)
    _object_ids(np.ascontiguousarray(local).reshape(-1), lookup, flat, into, mark, out)
    return out.reshape(local.shape)
