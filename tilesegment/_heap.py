"""Keep glibc's heap from holding on to the large buffers a run frees."""

from __future__ import annotations

import ctypes
import sys

__all__ = ["return_large_buffers"]

#: Allocations from this size up are mapped on their own and unmapped when freed.
LARGE = 1 << 20

_M_MMAP_THRESHOLD = -3  # mallopt parameter, <malloc.h>
_set = False


def return_large_buffers() -> bool:
    """Make glibc serve allocations of 1 MiB and more with their own mappings; return
    whether it did (glibc only; other C libraries are left alone).

    By default glibc raises its mmap threshold to the size of each large block
    freed (up to 32 MiB), after which blocks that size come from the heaps of
    the reader, executor and writer threads, where freed space is kept. A
    volume run frees tens of megabytes per tile (decoded chunks, batches,
    outputs), and its resident memory then grows with the run: peak RSS
    1123 MB on a 512 x 2048 x 2048 volume against 850 MB on a 128 x 512 x 512
    one; 757 against 657 MB (1.15x) with the threshold fixed at 1 MiB
    (benchmarks/memory_scaling_3d.py). Setting it once for the process turns
    the dynamic threshold off. A large buffer then costs a fresh mapping
    whose pages are faulted in: the host pipeline alone, with a network that
    computes nothing, takes about 1.35x as long; with a real 3-d network,
    seconds per tile, the difference is not measurable. Only volume runs set
    it (slides do not need it: 1.06x without), and it stays set for the rest
    of the process.
    """
    global _set
    if _set or not sys.platform.startswith("linux"):
        return _set
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _set = bool(mallopt(_M_MMAP_THRESHOLD, LARGE))
    return _set
