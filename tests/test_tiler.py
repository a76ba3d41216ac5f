import threading
import time

import numpy as np

import tilesegment as ts


class SlowArray:
    """An image whose every read takes a while (a remote or compressed slide), counting
    how many reads run at once."""

    def __init__(self, data, seconds):
        self.data, self.seconds = data, seconds
        self.shape, self.dtype = data.shape, data.dtype
        self.running = self.peak = 0
        self._lock = threading.Lock()

    def __getitem__(self, index):
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
        return self.data[index]


def test_every_reader_thread_works_even_when_batches_are_small():
    source = SlowArray(np.zeros((64, 64, 3), np.uint8), seconds=0.05)
    tiler = ts.Tiler(source, ts.Geometry(halo=2, step=4), tile_size=16)
    readers = 8
    batches = list(tiler.batches(2, prefetch=2, workers=readers))  # prefetch counts batches: 6 tiles
    assert sum(len(b) for b in batches) == tiler.plan.n_tiles == 16
    assert source.peak >= min(readers, tiler.plan.n_tiles)
