"""Decode every stored chunk of a source once, however many tile inputs reach into it.

A tile's padded input overlaps its neighbours' by twice the halo, so reading
each input from the file decodes the shared storage tiles (the 256-px JPEG
tiles of a slide) again for every tile that reaches them: about 2.4x the
pixels at tile 1024. `ChunkCache` keeps each decoded chunk exactly as long as
a tile that is still to be read needs it. It knows that from the plan: before
the run, every chunk gets a count of the tile inputs that overlap it, and a
chunk leaves the cache when its last reader is done. Memory is therefore set
by the order of the plan (about one band of chunks across the image), never
by the image; a byte budget bounds it in any case, at the price of decoding
again what it had to drop.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import Future
from typing import Optional, Sequence

import numpy as np

__all__ = ["ChunkCache", "DEFAULT_CACHE_BYTES", "VOLUME_CACHE_BYTES"]

#: Default bound on the decoded chunks held at once. The live set of a
#: row-major plan is about two rows of chunks across the image: 150 MB for a
#: 100,000-px wide RGB slide stored in 256-px tiles.
DEFAULT_CACHE_BYTES = 1 << 30

#: Default bound for volumes (raised to fit the chunks one tile input can span). Their tile
#: inputs overlap the previous slab of tiles along z, and holding those chunks would
#: take a whole plane of them; a small bound decodes them again instead, so memory
#: stays set by the tile and the chunks, never the volume.
VOLUME_CACHE_BYTES = 64 << 20


class ChunkCache:
    """Decoded chunks of `source`, each kept until the last tile that needs it is read.

    Parameters
    ----------
    source : ImageSource
        Must have a ``chunk_shape`` and ``read_chunk(*index)`` over its plan axes.
    spans : numpy.ndarray
        ``(n, 2 * ndim)`` source regions ``start_0, stop_0, start_1, stop_1, ...``
        (``y0, y1, x0, x1`` for an image; stops exclusive) that will be read,
        one per tile, in any order; each chunk's use count comes from them. A
        region read that is not in `spans` still works, it just cannot keep
        its chunks for later.
    max_bytes : int
        Bound on the decoded bytes held. Past it, the chunks whose next
        reader comes last in `spans` go first (Belady's rule: the fewest
        decodes again, since the order of the reads is known).

    Notes
    -----
    Thread-safe: reader threads that need the same chunk at once wait for the
    one that decodes it, and decoding itself runs outside the lock (tifffile
    and imagecodecs release the GIL), so chunks decode in parallel.
    """

    def __init__(self, source, spans: np.ndarray, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.source = source
        self.chunk_shape = tuple(int(c) for c in source.chunk_shape)
        self.ndim = len(self.chunk_shape)
        self.grid = tuple(-(-n // c) for n, c in zip(source.shape, self.chunk_shape))
        self.max_bytes = int(max_bytes)
        self._spans = np.asarray(spans, np.int64).reshape(-1, 2 * self.ndim)
        self._uses = self._count_uses(self._spans)
        self._total = self._uses.copy()
        self._readers: Optional[dict] = None  # per chunk, its readers in order; built when first needed
        self._chunks: dict[tuple[int, ...], Future] = {}
        self._held: dict[tuple[int, ...], int] = {}  # bytes counted per decoded chunk held
        self._bytes = 0
        self._lock = threading.Lock()
        #: Chunks decoded so far, counting those decoded again after eviction.
        self.decoded = 0
        #: Largest number of bytes held at once.
        self.peak_bytes = 0

    def _chunk_range(self, start: Sequence[int], stop: Sequence[int]) -> tuple[slice, ...]:
        return tuple(slice(a // c, -(-b // c)) for a, b, c in zip(start, stop, self.chunk_shape))

    def _count_uses(self, spans: np.ndarray) -> np.ndarray:
        # N-d difference array: +-1 at the 2^ndim corners of each span's chunk box,
        # then a cumulative sum per axis; O(spans + chunks).
        diff = np.zeros(tuple(g + 1 for g in self.grid), np.int64)
        low = spans[:, 0::2] // np.asarray(self.chunk_shape)
        high = -(-spans[:, 1::2] // np.asarray(self.chunk_shape))
        for corner in itertools.product((0, 1), repeat=self.ndim):
            index = tuple(np.where(bit, high[:, k], low[:, k]) for k, bit in enumerate(corner))
            np.add.at(diff, index, (-1) ** sum(corner))
        for axis in range(self.ndim):
            diff = diff.cumsum(axis)
        return diff[tuple(slice(0, -1) for _ in range(self.ndim))]

    @property
    def decoded_pixels(self) -> int:
        """Pixels decoded so far, counting whole chunks (edge chunks over-count the part
        outside the image)."""
        return self.decoded * int(np.prod(self.chunk_shape))

    def _get(self, key: tuple[int, ...]) -> np.ndarray:
        with self._lock:
            future = self._chunks.get(key)
            owner = future is None
            if owner:
                future = self._chunks[key] = Future()
        if not owner:
            return future.result()
        try:
            chunk = self.source.read_chunk(*key)
        except BaseException as exc:
            with self._lock:
                if self._chunks.get(key) is future:
                    del self._chunks[key]
            future.set_exception(exc)
            raise
        # Counted before the result is published, and only while this very entry is held:
        # whoever drops an entry subtracts exactly what was counted for it.
        with self._lock:
            self.decoded += 1
            if self._chunks.get(key) is future:
                self._held[key] = chunk.nbytes
                self._bytes += chunk.nbytes
                self.peak_bytes = max(self.peak_bytes, self._bytes)
                self._evict_over_budget(keep=key)
        future.set_result(chunk)
        return chunk

    def _drop(self, key: tuple[int, ...]) -> None:
        """Forget chunk `key` (under the lock); readers that hold its future keep the array."""
        self._chunks.pop(key, None)
        self._bytes -= self._held.pop(key, 0)

    def _evict_over_budget(self, keep: tuple[int, ...]) -> None:
        if self._bytes <= self.max_bytes:
            return
        for key in sorted((k for k in self._held if k != keep), key=self._next_reader, reverse=True):
            if self._bytes <= self.max_bytes:
                return
            self._drop(key)

    def _next_reader(self, key: tuple[int, ...]) -> float:
        """Position in `spans` of the next region that needs chunk `key` (inf: none)."""
        if self._readers is None:
            readers: dict = {}
            for i, span in enumerate(self._spans.tolist()):
                box = self._chunk_range(span[0::2], span[1::2])
                for k in itertools.product(*(range(r.start, r.stop) for r in box)):
                    readers.setdefault(k, []).append(i)
            self._readers = readers
        done = int(self._total[key] - self._uses[key])
        readers = self._readers.get(key, ())
        return readers[done] if done < len(readers) else float("inf")

    def read(self, start: Sequence[int], stop: Sequence[int], out: Optional[np.ndarray] = None) -> np.ndarray:
        """Pixels ``[start:stop]`` as a ``(*shape, C)`` array, assembled from decoded chunks."""
        if out is None:
            shape = tuple(b - a for a, b in zip(start, stop))
            out = np.empty((*shape, self.source.channels), self.source.dtype)
        for key in itertools.product(*(range(r.start, r.stop) for r in self._chunk_range(start, stop))):
            chunk = self._get(key)
            dest, src = [], []
            for k, a, b, c in zip(key, start, stop, self.chunk_shape):
                lo, hi = max(a, k * c), min(b, (k + 1) * c)
                dest.append(slice(lo - a, hi - a))
                src.append(slice(lo - k * c, hi - k * c))
            out[tuple(dest)] = chunk[tuple(src)]
        return out

    def clear(self) -> None:
        """Drop every decoded chunk (a run stopped early); the counters stay."""
        with self._lock:
            self._chunks.clear()
            self._held.clear()
            self._bytes = 0

    def release(self, start: Sequence[int], stop: Sequence[int]) -> None:
        """One reader of region ``[start:stop]`` is done: drop chunks nobody needs any more."""
        box = self._chunk_range(start, stop)
        with self._lock:
            uses = self._uses[box]
            np.subtract(uses, 1, out=uses, where=uses > 0)
            for index in zip(*np.nonzero(uses == 0)):
                self._drop(tuple(r.start + int(i) for r, i in zip(box, index)))
