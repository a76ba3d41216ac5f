"""Chunk steps: post-processing with a halo over a label map, chunk by chunk, exact for any chunking.

A `ChunkStep` (`tilesegment.contracts`) declares how far its result looks,
its `halo`, and computes one chunk from that chunk plus `halo` pixels of its
neighbours. `map_overlap` runs a step over a whole map:

- each chunk of the output is read from the input with its halo, clipped
  at the map's edges (there the block ends where the map ends, so the step
  sees the edge as it would on the whole map);
- the step computes the block, and only the chunk's own part, its *core*,
  is written.

The invariant: when the step's value at a pixel depends on nothing farther
than `halo`, the result equals the step applied to the whole map, for every
chunking. Each output chunk is written once, whole, by one task (chunks
are aligned with the output's stored chunks, so no two tasks share one); a
task holds one chunk plus its halo, so memory is O((chunk + 2 halo)^ndim)
per task, whatever the size of the map. Tasks run on a
`tilesegment.tasks.TaskRunner`: threads here, or a dask cluster.

Steps are registered by name in `tilesegment.registry.steps` (or through a
``tilesegment.steps`` entry point); `chain` runs several as one step whose
halo is the sum of theirs, so the map is read and written once whatever
their number.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .contracts import ChunkStep, Region, Reporter
from .errors import UsageError
from .registry import steps as registry
from .tasks import TaskRunner, chunk_groups, task_runner

__all__ = ["ChunkStep", "Chain", "get_step", "chain", "chunk_regions", "halo_region", "map_overlap"]


def get_step(step: Union[str, ChunkStep]) -> ChunkStep:
    """The step registered as `step` in `tilesegment.registry.steps` (a step passes through).

    Raises
    ------
    UsageError
        For an unknown name, listing the known ones, or an object that is not a `ChunkStep`.
    """
    if isinstance(step, str):
        if step not in registry:
            known = ", ".join(registry.names()) or "none installed"
            raise UsageError(f"step {step!r} is unknown; use a registered one ({known}) or pass a ChunkStep")
        return registry.get(step)
    if not isinstance(step, ChunkStep):
        raise UsageError(f"step {step!r} is not a ChunkStep: it needs name, halo, dtype and apply(block, core)")
    return step


@dataclass(frozen=True)
class Chain:
    """Several steps run as one: each on the result of the one before.

    The chain's halo is the sum of its steps' halos: step *i* is computed on
    the core grown by the halos of the steps after it, which is what those
    need around the core. Exact when each step is.
    """

    steps: tuple

    @property
    def name(self) -> str:
        return "+".join(step.name for step in self.steps)

    @property
    def halo(self) -> int:
        return sum(int(step.halo) for step in self.steps)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.steps[-1].dtype)

    def apply(self, block: np.ndarray, core: Region) -> np.ndarray:
        current, start = block, (0,) * block.ndim  # `current` covers the block from `start` on
        still = self.halo
        for step in self.steps:
            still -= int(step.halo)
            grown = tuple(slice(max(0, c.start - still), min(n, c.stop + still)) for c, n in zip(core, block.shape))
            inner = tuple(slice(g.start - s, g.stop - s) for g, s in zip(grown, start))
            current, start = _checked(step, current, inner), tuple(g.start for g in grown)
        return current


def chain(steps: Sequence[Union[str, ChunkStep]]) -> Optional[ChunkStep]:
    """One step that runs `steps` (names or `ChunkStep`\\ s) in order; None when there are none."""
    found = tuple(get_step(step) for step in steps)
    if not found:
        return None
    return found[0] if len(found) == 1 else Chain(found)


def chunk_regions(shape: Sequence[int], chunks: Sequence[int]) -> list[Region]:
    """The regions of a regular chunk grid over `shape`, in raster order (the last chunks clipped).

    >>> chunk_regions((3, 5), (2, 4))
    [(slice(0, 2, None), slice(0, 4, None)), (slice(0, 2, None), slice(4, 5, None)), \
(slice(2, 3, None), slice(0, 4, None)), (slice(2, 3, None), slice(4, 5, None))]
    """
    starts = [range(0, n, c) for n, c in zip(shape, chunks)]
    return [tuple(slice(a, min(a + c, n)) for a, c, n in zip(origin, chunks, shape))
            for origin in itertools.product(*starts)]


def halo_region(region: Region, halo: int, shape: Sequence[int]) -> tuple[Region, Region]:
    """The block to read for `region` (`halo` more on each side, clipped to `shape`) and the
    region's place in that block (its core).

    >>> halo_region((slice(0, 4), slice(4, 8)), 2, (10, 9))
    ((slice(0, 6, None), slice(2, 9, None)), (slice(0, 4, None), slice(2, 6, None)))
    """
    outer = tuple(slice(max(0, r.start - halo), min(n, r.stop + halo)) for r, n in zip(region, shape))
    core = tuple(slice(r.start - o.start, r.stop - o.start) for r, o in zip(region, outer))
    return outer, core


def _checked(step: ChunkStep, block: np.ndarray, core: Region) -> np.ndarray:
    """``step.apply(block, core)``, refused when it does not return the core's shape."""
    result = np.asarray(step.apply(block, core))
    want = tuple(c.stop - c.start for c in core)
    if result.shape != want:
        raise UsageError(f"step {step.name!r} returned shape {result.shape} for a core of {want}; "
                         "apply(block, core) must return the result for block[core] only")
    return result


#: Bytes of decoded source chunks `map_overlap` keeps for the blocks that share them.
CACHE_BYTES = 256 << 20


class CachedBlocks:
    """Reads blocks of a chunked array (zarr) through a small cache of its decoded chunks, shared by threads.

    A block with its halo spans up to 3 stored chunks per axis, and the next
    block in raster order shares 2 of the 3 along the last axis: read through
    this cache, each block decodes about 3 chunks (2-D) instead of 9. The
    cache holds at most ``2 * 3**ndim`` chunks (fewer if they would pass
    `CACHE_BYTES`), least recently used first out. Pickled, it travels
    without its contents (each worker process keeps its own).
    """

    def __init__(self, source: Any) -> None:
        self.source = source
        self.shape = tuple(int(n) for n in source.shape)
        self.chunks = tuple(int(c) for c in source.chunks)
        size = int(np.prod(self.chunks)) * np.dtype(source.dtype).itemsize
        self.capacity = max(3 ** len(self.shape) + 1, min(2 * 3 ** len(self.shape), CACHE_BYTES // max(1, size)))
        self.__setstate__(self.__dict__)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def _chunk(self, index: tuple[int, ...]) -> np.ndarray:
        with self._lock:
            found = self._cache.get(index)
            if found is not None:
                self._cache.move_to_end(index)
                return found
        region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, self.chunks, self.shape))
        data = np.asarray(self.source[region])  # outside the lock: two threads may decode one chunk once each
        with self._lock:
            self._cache[index] = data
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return data

    def __getitem__(self, outer: Region) -> np.ndarray:
        first = [s.start // c for s, c in zip(outer, self.chunks)]
        last = [(s.stop - 1) // c for s, c in zip(outer, self.chunks)]
        out = None
        for index in itertools.product(*(range(a, b + 1) for a, b in zip(first, last))):
            chunk = self._chunk(index)
            if out is None:
                out = np.empty(tuple(s.stop - s.start for s in outer), chunk.dtype)
            lo = [max(s.start, i * c) for s, i, c in zip(outer, index, self.chunks)]
            hi = [min(s.stop, (i + 1) * c) for s, i, c in zip(outer, index, self.chunks)]
            out[tuple(slice(a - s.start, b - s.start) for a, b, s in zip(lo, hi, outer))] = \
                chunk[tuple(slice(a - i * c, b - i * c) for a, b, i, c in zip(lo, hi, index, self.chunks))]
        return out


def _run_regions(step: ChunkStep, source: Any, dest: Any, measure: Optional[Callable[[Region, np.ndarray], Any]],
                 regions: list[Region]) -> tuple[int, list]:
    """One task: each region of `dest` from its block of `source`; returns the number done and
    what `measure` said of each."""
    said = []
    for region in regions:
        outer, core = halo_region(region, int(step.halo), source.shape)
        result = _checked(step, np.asarray(source[outer]), core)
        dest[region] = result
        if measure is not None:
            said.append(measure(region, result))
    return len(regions), said


def _check_aligned(dest: Any, chunks: tuple[int, ...]) -> None:
    stored = getattr(dest, "chunks", None)
    if stored is None:
        return
    for c, s, n in zip(chunks, stored, dest.shape):
        if c % s and c < n:
            raise UsageError(f"chunks {chunks} must be multiples of the output's stored chunks {tuple(stored)}, "
                             "so that each stored chunk is written by one task, once")


def map_overlap(
    step: Union[str, ChunkStep],
    source: Any,
    dest: Any,
    chunks: Union[None, int, Sequence[int]] = None,
    *,
    runner: Optional[TaskRunner] = None,
    reporter: Optional[Reporter] = None,
    measure: Optional[Callable[[Region, np.ndarray], Any]] = None,
    collect: Optional[Callable[[Any], None]] = None,
) -> Any:
    """Apply a chunk step to a whole label map, chunk by chunk with its halo; exact for any chunking.

    Parameters
    ----------
    step : ChunkStep or str
        The step, or the name it is registered under (`tilesegment.registry.steps`).
    source : array
        The map (numpy, zarr, dask: anything that slices to numpy), 2-D or 3-D.
    dest : numpy.ndarray or zarr.Array
        Where the result goes: the shape of `source`, a dtype that holds
        ``step.dtype``. Not `source` itself: a task reads its neighbours'
        pixels, which must not have been replaced yet.
    chunks : int or sequence of int, optional
        Chunk edge (one, or one per axis); default: `dest`'s stored chunks.
        Multiples of those, so that each stored chunk is written once.
    runner : TaskRunner, optional
        Where the chunks run (`tilesegment.tasks.task_runner`); default: this
        thread. On a cluster, `source` and `dest` must be arrays the workers
        reach (zarr on a shared path), not numpy.
    reporter : Reporter, optional
        Told ``advance(n)`` as chunks are written (it is not started or closed here).
    measure : callable, optional
        ``measure(region, result)``, run in the task on each chunk written
        (its region in the map, and its result), while the result is still in
        memory: what it returns goes to `collect`. Picklable, for a cluster.
    collect : callable, optional
        Called here with each `measure` value, in the order tasks finish.

    Returns
    -------
    dest

    Raises
    ------
    UsageError
        Shapes that differ, `source` as `dest`, chunks not aligned with
        `dest`'s, numpy arrays with a cluster, or a step whose result is not
        the core's shape.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import ndimage
    >>> class Widest:  # the largest label within one pixel (a grey dilation)
    ...     name, halo, dtype = "widest", 1, np.dtype(np.uint8)
    ...     def apply(self, block, core):
    ...         return ndimage.maximum_filter(block, size=3, mode="nearest")[core]
    >>> labels = np.zeros((6, 7), np.uint8); labels[2, 3] = 5
    >>> out = map_overlap(Widest(), labels, np.zeros_like(labels), chunks=2)
    >>> bool((out == ndimage.maximum_filter(labels, size=3)).all())
    True
    """
    step = get_step(step)
    runner = runner or task_runner()
    shape = tuple(int(n) for n in source.shape)
    if tuple(dest.shape) != shape:
        raise UsageError(f"the output has shape {tuple(dest.shape)}, the map {shape}; they must be the same")
    if dest is source:
        raise UsageError("map_overlap cannot write into its input: a chunk's halo is read from its "
                         "neighbours, which must still hold the input; pass another array")
    if chunks is None:
        chunks = getattr(dest, "chunks", None)
        if chunks is None:
            raise UsageError("pass chunks=: a numpy output has no chunks of its own")
    edge = (int(chunks),) * len(shape) if np.isscalar(chunks) else tuple(int(c) for c in chunks)
    if len(edge) != len(shape) or min(edge) < 1:
        raise UsageError(f"chunks {chunks!r} must be a positive edge or one per axis ({len(shape)} axes)")
    _check_aligned(dest, edge)
    if runner.remote and isinstance(dest, np.ndarray):
        raise UsageError("a cluster's workers cannot write into a numpy array here; pass a zarr array "
                         "on a path they share")
    regions = chunk_regions(shape, edge)
    groups = [[regions[i] for i in group] for group in chunk_groups(len(regions), runner)]
    stored = getattr(source, "chunks", None)
    if int(step.halo) > 0 and stored is not None and len(stored) == len(shape) and \
            all(isinstance(c, (int, np.integer)) for c in stored):  # zarr, not numpy or dask
        source = CachedBlocks(source)
    with closing(runner.map(_run_regions, groups, (step, source, dest, measure),
                            name=f"tilesegment-{step.name}")) as done:
        for _, (n, said) in done:
            if collect is not None:
                for value in said:
                    collect(value)
            if reporter is not None:
                reporter.advance(n)
    return dest
