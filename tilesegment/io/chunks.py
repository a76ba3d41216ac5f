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

import threading
from concurrent.futures import Future
from typing import Optional

import numpy as np

__all__ = ["ChunkCache", "DEFAULT_CACHE_BYTES"]

#: Default bound on the decoded chunks held at once. The live set of a
#: row-major plan is about two rows of chunks across the image: 150 MB for a
#: 100,000-px wide RGB slide stored in 256-px tiles.
DEFAULT_CACHE_BYTES = 1 << 30


class ChunkCache:
    """Decoded chunks of `source`, each kept until the last tile that needs it is read.

    Parameters
    ----------
    source : ImageSource
        Must have a ``chunk_shape`` and ``read_chunk(cy, cx)``.
    spans : numpy.ndarray
        ``(n, 4)`` source regions ``y0, y1, x0, x1`` (stop exclusive) that will
        be read, one per tile, in any order; each chunk's use count comes from
        them. A region read that is not in `spans` still works, it just
        cannot keep its chunks for later.
    max_bytes : int
        Bound on the decoded bytes held. Past it, the chunks decoded longest
        ago go first (and are decoded again if a later tile needs them).

    Notes
    -----
    Thread-safe: reader threads that need the same chunk at once wait for the
    one that decodes it, and decoding itself runs outside the lock (tifffile
    and imagecodecs release the GIL), so chunks decode in parallel.
    """

    def __init__(self, source, spans: np.ndarray, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.source = source
        self.chunk_shape = tuple(int(c) for c in source.chunk_shape)
        ny, nx = source.shape
        self.grid = (-(-ny // self.chunk_shape[0]), -(-nx // self.chunk_shape[1]))
        self.max_bytes = int(max_bytes)
        self._uses = self._count_uses(np.asarray(spans, np.int64).reshape(-1, 4))
        self._chunks: dict[tuple[int, int], Future] = {}  # insertion order = decode order
        self._bytes = 0
        self._lock = threading.Lock()
        #: Chunks decoded so far, counting those decoded again after eviction.
        self.decoded = 0
        #: Largest number of bytes held at once.
        self.peak_bytes = 0

    def _chunk_range(self, y0: int, y1: int, x0: int, x1: int) -> tuple[int, int, int, int]:
        cy, cx = self.chunk_shape
        return y0 // cy, -(-y1 // cy), x0 // cx, -(-x1 // cx)

    def _count_uses(self, spans: np.ndarray) -> np.ndarray:
        # 2-D difference array: +1 over each span's chunk rectangle, O(spans + chunks).
        diff = np.zeros((self.grid[0] + 1, self.grid[1] + 1), np.int64)
        cy, cx = self.chunk_shape
        a, b = spans[:, 0] // cy, -(-spans[:, 1] // cy)
        c, d = spans[:, 2] // cx, -(-spans[:, 3] // cx)
        np.add.at(diff, (a, c), 1)
        np.add.at(diff, (a, d), -1)
        np.add.at(diff, (b, c), -1)
        np.add.at(diff, (b, d), 1)
        return diff.cumsum(0).cumsum(1)[:-1, :-1]

    @property
    def decoded_pixels(self) -> int:
        """Pixels decoded so far, counting whole chunks (edge chunks over-count the part
        outside the image)."""
        return self.decoded * self.chunk_shape[0] * self.chunk_shape[1]

    def _get(self, key: tuple[int, int]) -> np.ndarray:
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
                del self._chunks[key]
            future.set_exception(exc)
            raise
        future.set_result(chunk)
        with self._lock:
            self.decoded += 1
            if key in self._chunks:
                self._bytes += chunk.nbytes
                self.peak_bytes = max(self.peak_bytes, self._bytes)
                self._evict_over_budget(keep=key)
        return chunk

    def _evict_over_budget(self, keep: tuple[int, int]) -> None:
        if self._bytes <= self.max_bytes:
            return
        for key in list(self._chunks):
            if self._bytes <= self.max_bytes:
                return
            future = self._chunks[key]
            if key != keep and future.done() and future.exception() is None:
                del self._chunks[key]
                self._bytes -= future.result().nbytes

    def read(self, y0: int, y1: int, x0: int, x1: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` as a ``(Y, X, C)`` array, assembled from decoded chunks."""
        cy, cx = self.chunk_shape
        if out is None:
            out = np.empty((y1 - y0, x1 - x0, self.source.channels), self.source.dtype)
        a, b, c, d = self._chunk_range(y0, y1, x0, x1)
        for i in range(a, b):
            for j in range(c, d):
                chunk = self._get((i, j))
                ys, xs = max(y0, i * cy), max(x0, j * cx)
                ye, xe = min(y1, (i + 1) * cy), min(x1, (j + 1) * cx)
                out[ys - y0 : ye - y0, xs - x0 : xe - x0] = chunk[ys - i * cy : ye - i * cy, xs - j * cx : xe - j * cx]
        return out

    def clear(self) -> None:
        """Drop every decoded chunk (a run stopped early); the counters stay."""
        with self._lock:
            self._chunks.clear()
            self._bytes = 0

    def release(self, y0: int, y1: int, x0: int, x1: int) -> None:
        """One reader of region ``[y0:y1, x0:x1]`` is done: drop chunks nobody needs any more."""
        a, b, c, d = self._chunk_range(y0, y1, x0, x1)
        with self._lock:
            uses = self._uses[a:b, c:d]
            np.subtract(uses, 1, out=uses, where=uses > 0)
            for i, j in zip(*np.nonzero(uses == 0)):
                future = self._chunks.pop((a + int(i), c + int(j)), None)
                if future is not None and future.done() and future.exception() is None:
                    self._bytes -= future.result().nbytes
