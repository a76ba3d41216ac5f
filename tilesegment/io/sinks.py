"""Where finished blocks go: a numpy array in memory, or an OME-Zarr image on disk."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Protocol, Union

import numpy as np

from ..errors import OutputExistsError, UsageError
from .manifest import Manifest

__all__ = ["Sink", "MemorySink", "ZarrSink", "BlockSink", "is_local_path", "palette"]

Region = tuple[slice, slice]


class Sink(Protocol):
    """What the stitcher needs from an output."""

    def buffer(self, region: Region) -> np.ndarray:
        """An array to crop the tiles of `region` into."""

    def commit(self, region: Region, buffer: np.ndarray, block: Optional[int] = None,
               failed: Optional[list] = None) -> None:
        """`buffer` holds all of `region` (block `block` of the plan, with `failed`
        unreadable tiles filled): store it."""

    def close(self) -> Any:
        """Finish and return the result."""

    def abort(self) -> None:
        """Stop after an error; leave nothing half-done that looks finished."""


class MemorySink:
    """The whole output as one numpy array; blocks are views into it."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.array = np.zeros(shape, dtype=dtype)

    def buffer(self, region: Region) -> np.ndarray:
        return self.array[(..., *region)]

    def commit(self, region: Region, buffer: np.ndarray, block: Optional[int] = None,
               failed: Optional[list] = None) -> None:
        pass  # the buffer is a view of the result

    def close(self) -> np.ndarray:
        return self.array

    def abort(self) -> None:
        pass


class BlockSink:
    """Writes blocks straight into an existing zarr array and records them done.

    What a distributed task uses: it owns a few blocks of an output that the
    client created, writes each synchronously, then marks it in the manifest.
    """

    def __init__(self, array: Any, manifest: Optional[Manifest] = None) -> None:
        self.array, self.manifest = array, manifest

    def buffer(self, region: Region) -> np.ndarray:
        return _zeros_like_region(self.array, region)

    def commit(self, region: Region, buffer: np.ndarray, block: Optional[int] = None,
               failed: Optional[list] = None) -> None:
        self.array[(..., *region)] = buffer
        if self.manifest is not None and block is not None:
            self.manifest.mark_done(block, failed)

    def close(self) -> Any:
        return self.array

    def abort(self) -> None:
        pass


def _zeros_like_region(array: Any, region: Region) -> np.ndarray:
    """A zero buffer for `region` of `array` (leading channel axes kept)."""
    shape = tuple(s.stop - s.start for s in region)
    return np.zeros((*array.shape[:-2], *shape), dtype=array.dtype)


def is_local_path(output: Any) -> bool:
    """A local path (URLs such as s3://... go to zarr/fsspec as stores)."""
    return isinstance(output, (str, os.PathLike)) and "://" not in os.fspath(output)


class ZarrSink:
    """An OME-Zarr (NGFF 0.5, zarr v3) image group with the result as array ``"0"``.

    Blocks are written by a thread pool (compression releases the GIL); at
    most ``2 * writers`` blocks wait in memory. When the output exists and
    `overwrite` is set, the new image is written beside it and swapped in
    only once complete, so a failed run never destroys the old one.

    With a run `record` (local paths only), every block is marked done in the
    output's manifest after its chunks are written; a run that stops early
    (error, Ctrl-C, SIGKILL) with at least one block done leaves a resumable
    output, and ``resume=True`` reopens it. A failed run with nothing done
    removes what it wrote.
    """

    def __init__(
        self,
        output: Union[str, os.PathLike, Any],
        shape: tuple[int, ...],
        dtype: np.dtype,
        chunks: tuple[int, ...],
        *,
        overwrite: bool = False,
        pixel_size: Optional[tuple[float, float]] = None,
        writers: int = 2,
        labels: Optional[int] = None,
        record: Optional[dict] = None,
        resume: bool = False,
        dimension_names: Optional[tuple[str, ...]] = None,
    ) -> None:
        import zarr

        self._final: Optional[Path] = None
        self._names = dimension_names or (("y", "x") if len(shape) == 2 else ("c", "y", "x"))
        self._pixel_size, self._labels = pixel_size, labels
        self._title = Path(str(output)).stem
        self._record, self.manifest = record, None
        self.failed_tiles: list[dict] = []  # unreadable tiles filled as background
        #: Keep the output on abort even with nothing done (set when other processes may
        #: still be writing into it, as in a distributed run).
        self.keep = False
        if resume:
            self._final = self._path = Path(output)
            self.group = zarr.open_group(self._path, mode="r+")
            self.array = self.group["0"]
            if self.array.shape != tuple(shape) or self.array.dtype != np.dtype(dtype):
                raise UsageError(f"cannot resume {str(output)!r}: its array is {self.array.shape} "
                                 f"{self.array.dtype}, this run writes {tuple(shape)} {np.dtype(dtype)}")
            self.manifest = Manifest(self._path)
        else:
            self.check_output(output, overwrite)
            target = output
            if is_local_path(output):
                self._final = Path(output)
                for stale in self._final.parent.glob(f".{self._final.name}.*.tmp"):
                    _remove(stale)  # left by an overwrite run that was killed
                if self._final.exists():
                    target = self._final.with_name(f".{self._final.name}.{uuid.uuid4().hex[:8]}.tmp")
                self._path = Path(target)
            mode = "w" if overwrite and not is_local_path(output) else "w-"
            self.group = zarr.open_group(target, mode=mode, zarr_format=3)
            # The OME metadata is written last, in close(): until then the group is not an
            # image, so a run killed midway never leaves something that looks complete.
            self.array = self._create("0", shape, chunks, dtype)
            if record is not None and self._final is not None:
                self.manifest = Manifest(self._path)
                self.manifest.start(record)
        self._pool = ThreadPoolExecutor(max(1, writers), thread_name_prefix="tilesegment-write")
        self._slots = threading.BoundedSemaphore(2 * max(1, writers))
        self._futures: list[Future] = []

    def _create(self, name: str, shape, chunks, dtype):
        from zarr.codecs import BloscCodec

        return self.group.create_array(
            name,
            overwrite=name != "0",  # a run killed while building the pyramid left some levels
            shape=shape,
            chunks=tuple(min(c, n) for c, n in zip(chunks, shape)),
            dtype=dtype,
            fill_value=0,
            compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
            dimension_names=self._names,
        )

    def _metadata(self, n_levels: int) -> dict:
        meta = _multiscales(self._names, self._pixel_size, self._title, n_levels)
        if self._labels is not None:
            meta["image-label"] = {
                "version": "0.5",
                "colors": [{"label-value": k, "rgba": list(rgba)} for k, rgba in enumerate(palette(self._labels))],
            }
        return meta

    def _build_pyramid(self, smallest: int = 1024) -> int:
        """Write 2x-downsampled levels until the last fits `smallest` px; return the level count.

        Labels take the top-left pixel of each 2x2 (nearest: labels stay
        labels); probabilities and logits the mean. Each level is written
        chunk by chunk from the previous one, in the writer threads.
        """
        previous, level = self.array, 0
        while max(previous.shape[-2:]) > smallest:
            level += 1
            shape = (*previous.shape[:-2], *(-(-n // 2) for n in previous.shape[-2:]))
            current = self._create(str(level), shape, self.array.chunks, self.array.dtype)
            ch, cw = current.chunks[-2:]
            jobs = [
                self._pool.submit(self._downsample, previous, current, y, x)
                for y in range(0, shape[-2], ch)
                for x in range(0, shape[-1], cw)
            ]
            for job in jobs:
                job.result()
            previous = current
        return level + 1

    def _downsample(self, source, dest, y: int, x: int) -> None:
        ch, cw = dest.chunks[-2:]
        y1, x1 = min(y + ch, dest.shape[-2]), min(x + cw, dest.shape[-1])
        block = source[..., 2 * y : 2 * y1, 2 * x : 2 * x1]
        if self._labels is not None:
            dest[..., y:y1, x:x1] = block[..., ::2, ::2]
            return
        pad = [(0, 0)] * (block.ndim - 2) + [(0, 2 * (y1 - y) - block.shape[-2]), (0, 2 * (x1 - x) - block.shape[-1])]
        block = np.pad(block.astype(np.float32), pad, mode="edge")
        mean = (block[..., ::2, ::2] + block[..., 1::2, ::2] + block[..., ::2, 1::2] + block[..., 1::2, 1::2]) / 4
        dest[..., y:y1, x:x1] = np.rint(mean) if dest.dtype.kind == "u" else mean

    @staticmethod
    def check_output(output: Any, overwrite: bool) -> None:
        """Raise `OutputExistsError` if `output` exists and `overwrite` is false.

        For zarr stores and URLs (not local paths) `overwrite=True` clears the
        store when the run starts: there is no sibling to write beside.
        """
        if not is_local_path(output):
            if not overwrite and _store_has_group(output):
                raise OutputExistsError(
                    f"output store {output!r} already holds a zarr group; pass overwrite=True "
                    "(CLI: --overwrite) to clear and replace it, or use an empty store"
                )
            return
        path = Path(output)
        if path.exists() and not overwrite:
            raise OutputExistsError(
                f"output {str(path)!r} exists; pass overwrite=True (CLI: --overwrite) to replace "
                "it, or choose another path"
            )
        if not path.parent.exists():
            raise UsageError(f"output folder {str(path.parent)!r} does not exist; create it first")
        if not os.access(path.parent, os.W_OK):
            raise UsageError(f"output folder {str(path.parent)!r} is not writable; choose another place")

    def buffer(self, region: Region) -> np.ndarray:
        return _zeros_like_region(self.array, region)

    def commit(self, region: Region, buffer: np.ndarray, block: Optional[int] = None,
               failed: Optional[list] = None) -> None:
        self._slots.acquire()  # back-pressure: never more than 2 * writers blocks queued
        future = self._pool.submit(self._write, region, buffer, block, failed)
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)
        self._raise_failed()

    def _write(self, region: Region, buffer: np.ndarray, block: Optional[int], failed) -> None:
        self.array[(..., *region)] = buffer
        if self.manifest is not None and block is not None:
            self.manifest.mark_done(block, failed)  # only now are the block's chunks on disk

    def _raise_failed(self) -> None:
        done = [f for f in self._futures if f.done()]
        self._futures = [f for f in self._futures if not f.done()]
        for future in done:
            future.result()

    def close(self) -> Any:
        try:
            for future in self._futures:
                future.result()
            self._raise_failed()
            self.group.attrs["ome"] = self._metadata(self._build_pyramid())
            if self.manifest is not None:  # includes blocks of earlier, resumed runs
                self.failed_tiles = self.manifest.failed_tiles()
            if self._record is not None or self.failed_tiles:
                self.group.attrs["tilesegment"] = {**(self._record or {}), "complete": True,
                                                   "failed_tiles": self.failed_tiles}
            self._pool.shutdown(wait=True)
            if self.manifest is not None:
                self.manifest.finish()
        except BaseException:
            self.abort()
            raise
        if self._final is not None and self._path != self._final:
            backup = self._final.with_name(f".{self._final.name}.{uuid.uuid4().hex[:8]}.old")
            self._final.rename(backup)
            try:
                self._path.rename(self._final)
            except BaseException:
                backup.rename(self._final)  # put the old output back where it was
                raise
            _remove(backup)
        import zarr

        root = zarr.open_group(self._final if self._final is not None else self.group.store, mode="r")
        return root["0"]

    @property
    def path(self) -> Optional[Path]:
        """Where this run writes (a temporary sibling while overwriting); None for stores."""
        return self._path if self._final is not None else None

    @property
    def resumable(self) -> bool:
        """Whether a stopped run left blocks that `resume=True` can build on."""
        return (self.manifest is not None and self._path == self._final
                and len(self.manifest.done_blocks()) > 0)

    def abort(self) -> None:
        """Stop writing: blocks in flight finish (and are recorded), queued ones are dropped.

        A resumable output is kept; otherwise what this run wrote is removed (an
        older output being overwritten stays as it was).
        """
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._final is not None and not self.resumable and not (self.keep and self._path == self._final):
            _remove(self._path)


def _store_has_group(store: Any) -> bool:
    import zarr

    try:
        zarr.open_group(store, mode="r")
        return True
    except Exception:
        return False


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def palette(n: int) -> list[tuple[int, int, int, int]]:
    """RGBA colour per label value: 0 transparent, then green, yellow and tab10 colours."""
    colours = [(40, 170, 90), (255, 210, 0), (31, 119, 180), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    return [(0, 0, 0, 0)] + [(*colours[(k - 1) % len(colours)], 255) for k in range(1, n)]


def _multiscales(names: tuple[str, ...], pixel_size, name: str, n_levels: int = 1) -> dict:
    axes = [
        {"name": n, "type": "channel"} if n == "c" else {"name": n, "type": "space", "unit": "micrometer"}
        for n in names
    ]
    if pixel_size is None:
        for axis in axes:
            axis.pop("unit", None)
        pixel_size = (1.0, 1.0)
    datasets = []
    for level in range(n_levels):  # the pyramid halves the last two axes only
        *lead, py, px = (float(p) for p in pixel_size)
        scale = [1.0] * (len(names) - 2 - len(lead)) + lead + [py * 2**level, px * 2**level]
        datasets.append(
            {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    return {"version": "0.5", "multiscales": [{"name": name, "axes": axes, "datasets": datasets}]}
