"""Where finished blocks go: a numpy array in memory, or an OME-Zarr image on disk."""

from __future__ import annotations

import itertools
import os
import shutil
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..contracts import Region, Sink
from ..errors import OutputExistsError, UsageError
from . import durable
from .manifest import Manifest
from .ngff import downsample, multiscales, ngff_version, pyramid_factors, write_ome
from .remote import filesystem_options, is_url

__all__ = ["Sink", "MemorySink", "ZarrSink", "BlockSink", "is_local_path", "palette", "NGFF_VERSIONS",
           "check_ngff"]

#: OME-Zarr versions we write: 0.5 (zarr v3, the default) and 0.4 (zarr v2, for QuPath and
#: older napari-ome-zarr / ome-zarr-py readers).
NGFF_VERSIONS = ("0.5", "0.4")


def check_ngff(version: str) -> str:
    """Return `version` as a string if we can write it; raise `UsageError` otherwise."""
    text = str(version)
    if text not in NGFF_VERSIONS:
        raise UsageError(f"ngff {version!r} is not supported; use one of {', '.join(NGFF_VERSIONS)} "
                         "(0.4 writes zarr v2 for QuPath and older readers)")
    return text


class MemorySink:
    """The whole output as one numpy array; blocks are views into it."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.array = np.zeros(shape, dtype=dtype)

    def buffer(self, region: Region) -> np.ndarray:
        return self.array[region]

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
    client created, writes each synchronously (fsynced on a local disk), then
    marks it in the manifest.
    """

    def __init__(self, array: Any, manifest: Optional[Manifest] = None) -> None:
        self.array, self.manifest = writing_every_chunk(array), manifest
        self._synced: set = set()  # chunk folders whose entries are on the disk (durable.sync_region)

    def buffer(self, region: Region) -> np.ndarray:
        return _zeros_like_region(self.array, region)

    def commit(self, region: Region, buffer: np.ndarray, block: Optional[int] = None,
               failed: Optional[list] = None) -> None:
        self.array[region] = buffer
        if self.manifest is not None and block is not None:
            # the marker promises the chunks are on the disk
            durable.sync_region(self.array, region, self._synced)
            self.manifest.mark_done(block, failed)

    def close(self) -> Any:
        return self.array

    def abort(self) -> None:
        pass


def writing_every_chunk(array: Any) -> Any:
    """`array` (a zarr array opened again) writing every chunk, as `ZarrSink` creates its arrays.

    The setting is not stored with an array: opened again, zarr skips chunks that hold only
    the fill value, so a resumed run or a cluster task would leave out chunks that an
    uninterrupted run writes (the same pixels, not the same files).
    """
    with_config = getattr(array, "with_config", None)
    return with_config({"write_empty_chunks": True}) if with_config is not None else array


def _zeros_like_region(array: Any, region: Region) -> np.ndarray:
    """A zero buffer for `region` of `array`."""
    shape = tuple(len(range(*s.indices(n))) for s, n in zip(region, array.shape))
    return np.zeros(shape, dtype=array.dtype)


def is_local_path(output: Any) -> bool:
    """A local path (URLs such as s3://... go to zarr/fsspec as stores)."""
    return isinstance(output, (str, os.PathLike)) and "://" not in os.fspath(output)


@dataclass(frozen=True)
class LevelWriter:
    """An array that, written region by region, also writes the region downsampled by `step`
    into `level` (`ZarrSink.writer`). Regions must start on multiples of `step`."""

    array: Any
    level: Any
    step: tuple[int, ...]
    nearest: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self.array.chunks)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __getitem__(self, region: Region) -> Any:
        return self.array[region]

    def __setitem__(self, region: Region, data: np.ndarray) -> None:
        self.array[region] = data
        lower = tuple(slice(r.start // s, -(-r.stop // s)) for r, s in zip(region, self.step))
        self.level[lower] = downsample(np.asarray(data), self.step, self.nearest)


class ZarrSink:
    """An OME-Zarr image group with the result as array ``"0"``.

    NGFF 0.5 (zarr v3, metadata under ``attrs["ome"]``) by default; with
    ``ngff="0.4"`` zarr v2 with "/"-separated chunk keys and the 0.4
    metadata at the top level of the attributes, which QuPath and older
    readers understand. Resuming keeps the version of the output found.

    Blocks are written by a thread pool (compression releases the GIL); at
    most ``2 * writers`` blocks wait in memory. When the output exists and
    `overwrite` is set, the new image is written beside it and swapped in
    only once complete, so a failed run never destroys the old one.

    With a run `record` (local paths and URLs), every block is marked done in
    the output's manifest after its chunks are written (on a local disk:
    fsynced, `tilesegment.io.durable`; on an object store: every PUT
    returned); a run that stops
    early (error, Ctrl-C, SIGKILL) with at least one block done leaves a
    resumable output, and ``resume=True`` reopens it. A failed run with
    nothing done removes what it wrote.

    A URL output (``s3://bucket/out.zarr``) is written through zarr's fsspec
    store with `storage_options`; it has no sibling to write beside, so
    ``overwrite=True`` clears it when the run starts.

    Chunks are compressed with Blosc zstd level 3 and bit shuffle (small
    class maps); ``fast=True`` takes level 1 and byte shuffle, which encodes
    object ids (uint32) three times faster for 11 % more bytes. The pyramid
    keeps the first value of each group for label maps (`labels`, or
    ``nearest=True`` for ids that are no class map) and the mean otherwise.
    """

    def __init__(
        self,
        output: Union[str, os.PathLike, Any],
        shape: tuple[int, ...],
        dtype: np.dtype,
        chunks: tuple[int, ...],
        *,
        overwrite: bool = False,
        pixel_size: Optional[tuple[float, ...]] = None,
        writers: int = 2,
        labels: Optional[int] = None,
        record: Optional[dict] = None,
        resume: bool = False,
        ngff: str = "0.5",
        storage_options: Optional[dict] = None,
        dimension_names: Optional[tuple[str, ...]] = None,
        class_names: Optional[Sequence[str]] = None,
        label_image: bool = False,
        instances: Optional[dict] = None,
        source: Optional[dict] = None,
        fast: bool = False,
        nearest: Optional[bool] = None,
    ) -> None:
        import zarr

        self.ngff = check_ngff(ngff)
        self._final: Optional[Path] = None
        self._names = tuple(dimension_names or (("y", "x") if len(shape) == 2 else ("c", "y", "x")))
        self._pixel_size, self._labels, self._label_image = pixel_size, labels, label_image
        self._class_names = None if class_names is None else [str(n) for n in class_names]
        self._instances = instances
        self._source = source
        self._fast = fast
        self._nearest = labels is not None if nearest is None else bool(nearest)
        self._first_level: Any = None  # pyramid level 1, when `writer` fills it
        self._title = Path(str(output)).stem
        self._record, self.manifest = record, None
        self.failed_tiles: list[dict] = []  # unreadable tiles filled as background
        #: Keep the output on abort even with nothing done (set when other processes may
        #: still be writing into it, as in a distributed run).
        self.keep = False
        self._url = output if is_url(output) else None
        self._storage_options = storage_options
        # zarr takes storage_options only with URLs.
        zarr_options = {"storage_options": filesystem_options(storage_options)} if self._url else {}
        if resume and not _has_array(output, zarr_options):
            # Stopped before its array existed: nothing to keep, start again.
            self._clear_unstarted(output)
            resume = False
        if resume:
            if self._url is None:
                self._final = self._path = Path(output)
                _remove_partial_writes(self._path)
            self.group = zarr.open_group(self._url or self._path, mode="r+", **zarr_options)
            self.array = writing_every_chunk(self.group["0"])
            found = ngff_version(self.group)
            if found != self.ngff:
                raise UsageError(f"cannot resume {str(output)!r}: it is NGFF {found}, this run writes "
                                 f"NGFF {self.ngff}; pass ngff={found!r} (CLI: --ngff {found})")
            if self.array.shape != tuple(shape) or self.array.dtype != np.dtype(dtype):
                raise UsageError(f"cannot resume {str(output)!r}: its array is {self.array.shape} "
                                 f"{self.array.dtype}, this run writes {tuple(shape)} {np.dtype(dtype)}")
            self.manifest = Manifest(self._url or self._path, storage_options)
            self.manifest.reopen()
            self.keep = True  # written by earlier runs too: never removed on abort
        else:
            self.check_output(output, overwrite, storage_options)
            target = output
            if is_local_path(output):
                self._final = Path(output)
                _remove_stale_siblings(self._final)
                if self._final.exists():
                    target = self._final.with_name(f".{self._final.name}.{uuid.uuid4().hex[:8]}.tmp")
                self._path = Path(target)
            mode = "w" if overwrite and not is_local_path(output) else "w-"
            if record is not None and (self._final is not None or self._url is not None):
                self.manifest = Manifest(self._url or self._path, storage_options)
            # The manifest comes first (mode "w" would clear it): a run killed from here on
            # leaves an output that --resume continues, even before its group exists.
            if self.manifest is not None and mode == "w-":
                self.manifest.start(record)
                mode = "a"  # what is there is the manifest just started ("w-" refuses any data)
            self.group = zarr.open_group(target, mode=mode, zarr_format=self._zarr_format, **zarr_options)
            # The OME metadata is written last, in close(): until then the group is not an
            # image, so a run killed midway never leaves something that looks complete.
            self.array = self._create("0", shape, chunks, dtype)
            if self.manifest is not None and mode == "w":
                self.manifest.start(record)
        self._pool = ThreadPoolExecutor(max(1, writers), thread_name_prefix="tilesegment-write")
        self._slots = threading.BoundedSemaphore(2 * max(1, writers))
        self._futures: list[Future] = []
        self._scratch: list[str] = []
        self._synced: set = set()  # chunk folders whose entries are on the disk (durable.sync_region)

    @property
    def _zarr_format(self) -> int:
        return 2 if self.ngff == "0.4" else 3

    def _clear_unstarted(self, output: Any) -> None:
        """Remove an output whose run stopped before its array was created (a manifest and
        perhaps a group): moved aside at once, so that a kill meanwhile leaves no half of it."""
        if is_local_path(output):
            path = Path(output)
            if path.exists():
                aside = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
                path.rename(aside)
                _remove(aside)
        else:
            from .remote import filesystem

            fs, root = filesystem(output, self._storage_options)
            if fs.exists(root):
                fs.rm(root, recursive=True)

    def _create(self, name: str, shape, chunks, dtype, scratch: bool = False):
        options: dict[str, Any]
        # `fast`: object ids (uint32) encode 3x faster with byte shuffle at level 1, 11 % larger;
        # a scratch array, read back once, decodes 2-3x faster still with lz4
        cname, level, shuffle = ("lz4", 5, "shuffle") if scratch else ("zstd", 1, "shuffle") if self._fast \
            else ("zstd", 3, "bitshuffle")
        if self._zarr_format == 3:
            from zarr.codecs import BloscCodec

            options = dict(compressors=BloscCodec(cname=cname, clevel=level, shuffle=shuffle),
                           dimension_names=self._names)
        else:
            from numcodecs import Blosc

            # NGFF 0.4 requires "/" chunk keys; v2 has no dimension names (the axes say them).
            options = dict(compressors=Blosc(cname=cname, clevel=level,
                                             shuffle=Blosc.SHUFFLE if shuffle == "shuffle" else Blosc.BITSHUFFLE),
                           chunk_key_encoding={"name": "v2", "separator": "/"})
        return self.group.create_array(
            name,
            overwrite=name != "0",  # a run killed while building the pyramid left some levels
            shape=shape,
            chunks=tuple(min(c, n) for c, n in zip(chunks, shape)),
            dtype=dtype,
            fill_value=0,
            # Every chunk is written once, whole: checking each for "all fill value" first
            # (zarr's default) costs a full pass over it, and an empty chunk compresses to bytes.
            config={"write_empty_chunks": True},
            **options,
        )

    def scratch(self, name: str, dtype: np.dtype) -> Any:
        """A temporary array shaped and chunked like the output, in its group; `close` deletes it.

        For passes that need the output's pixels twice: `label_objects` writes
        the numbered objects here, and its chunk steps read them back into the
        output (a step cannot write over the pixels its neighbours still read).
        """
        array = self._create(name, self.array.shape, self.array.chunks, dtype, scratch=True)
        self._scratch.append(name)
        return array

    def _metadata(self, factors: list[tuple[int, ...]]) -> dict:
        """The group's OME attributes for the pyramid `factors`, in this sink's NGFF version."""
        meta = multiscales(self._names, self._pixel_size, self._title, factors, self.ngff)
        if self._labels is not None and not self._label_image:
            # A class map at the root of an output is an image whose display window spans its
            # classes. It carries no image-label: napari-ome-zarr opens an image-label group as
            # the label of an image two folders up, and creates a group there (zarr mode "a"),
            # in the user's folder. Labels proper live in labels/ (label_objects).
            meta["omero"] = {"channels": [{
                "label": "classes", "color": "FFFFFF", "active": True,
                "window": {"min": 0, "max": self._labels - 1, "start": 0, "end": self._labels - 1}}]}
        elif self._labels is not None:
            meta["image-label"] = {
                "version": self.ngff,
                "colors": [{"label-value": k, "rgba": list(rgba)} for k, rgba in enumerate(palette(self._labels))],
            }
            if self._class_names:
                meta["image-label"]["properties"] = [
                    {"label-value": k, "class": name} for k, name in enumerate(self._class_names)]
        return meta

    def _build_pyramid(self) -> list[tuple[int, ...]]:
        """Write the downsampled levels `pyramid_factors` asks for; return their factors.

        Labels take the first voxel of each group (nearest: labels stay
        labels); probabilities and logits the mean. Each level is written
        chunk by chunk from the previous one, in the writer threads.
        """
        factors = pyramid_factors(self.array.shape, self._names, self._pixel_size)
        previous, last = self.array, (1,) * self.array.ndim
        for level, factor in enumerate(factors, start=1):
            if level == 1 and self._first_level is not None:  # filled by `writer`'s writes
                previous, last = self._first_level, factor
                continue
            step = tuple(f // g for f, g in zip(factor, last))
            shape = tuple(-(-n // s) for n, s in zip(previous.shape, step))
            current = self._create(str(level), shape, self.array.chunks, self.array.dtype)
            grid = itertools.product(*(range(0, n, c) for n, c in zip(shape, current.chunks)))
            jobs = [self._pool.submit(self._downsample, previous, current, start, step) for start in grid]
            for job in jobs:
                job.result()
            previous, last = current, factor
        return factors

    def _downsample(self, source, dest, start: tuple[int, ...], step: tuple[int, ...]) -> None:
        stop = [min(a + c, n) for a, c, n in zip(start, dest.chunks, dest.shape)]
        block = source[tuple(slice(a * s, b * s) for a, b, s in zip(start, stop, step))]
        dest[tuple(slice(a, b) for a, b in zip(start, stop))] = downsample(block, step, self._nearest)

    def writer(self) -> Any:
        """Where a pass that writes each chunk of the result once, whole, should write.

        It writes the result (array ``"0"``) and, from the same pixels, the
        first pyramid level, whose chunks are made to cover one chunk of the
        result each, so that `close` does not read the whole result back for
        it. The plain array when there is no pyramid or its step does not
        divide the chunks. Call it once, before the writes.
        """
        factors = pyramid_factors(self.array.shape, self._names, self._pixel_size)
        if not factors or any(c % s for c, s in zip(self.array.chunks, factors[0])):
            return self.array
        step = factors[0]
        shape = tuple(-(-n // s) for n, s in zip(self.array.shape, step))
        self._first_level = self._create("1", shape, tuple(c // s for c, s in zip(self.array.chunks, step)),
                                         self.array.dtype)
        return LevelWriter(self.array, self._first_level, step, self._nearest)

    @staticmethod
    def check_output(output: Any, overwrite: bool, storage_options: Optional[dict] = None) -> None:
        """Raise `OutputExistsError` if `output` exists and `overwrite` is false.

        For zarr stores and URLs (not local paths) `overwrite=True` clears the
        store when the run starts: there is no sibling to write beside.
        """
        if not is_local_path(output):
            if not overwrite and _store_has_group(output, storage_options):
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
        self.array[region] = buffer  # returns once every chunk is written (every PUT, on a store)
        if self.manifest is not None and block is not None:
            # The marker promises the chunks survive a power loss: sync them first (local disks).
            durable.sync_region(self.array, region, self._synced)
            self.manifest.mark_done(block, failed)

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
            for name in self._scratch:
                del self.group[name]
            write_ome(self.group, self._metadata(self._build_pyramid()))
            if self.manifest is not None:  # includes blocks of earlier, resumed runs
                self.failed_tiles = self.manifest.failed_tiles()
            # Always written: it marks the store as tilesegment's, the only kind that
            # `label_objects` adds its labels to (never a store some other tool wrote).
            classes = {"classes": self._class_names} if self._class_names else {}
            if self._labels is not None:
                classes["label_values"] = self._labels  # values 0 .. label_values - 1
            if self._instances:
                classes["instances"] = dict(self._instances)
            if self._source:
                classes["source"] = dict(self._source)
            self.group.attrs["tilesegment"] = {**(self._record or {}), "complete": True,
                                               "failed_tiles": self.failed_tiles, **classes}
            self._pool.shutdown(wait=True)
            if self._final is not None:
                # Pyramid, metadata and attributes on the disk before the manifest goes: a power
                # loss after this leaves a complete image, before it a resumable one. Blocks
                # marked done were synced when they were written.
                durable.sync_tree(self._path, skip=("0",) if self.manifest is not None else ())
            if self.manifest is not None:
                self.manifest.finish()
        except BaseException:
            self.abort()
            raise
        if self._final is not None and self._path != self._final:
            # Killed between the two renames, the old output waits as .old: the next run
            # into this path puts it back (`_remove_stale_siblings`).
            backup = self._final.with_name(f".{self._final.name}.{uuid.uuid4().hex[:8]}.old")
            self._final.rename(backup)
            try:
                self._path.rename(self._final)
            except BaseException:
                backup.rename(self._final)  # put the old output back where it was
                raise
            _remove(backup)
        if self._final is not None:  # the output's entry (a new folder, or the swap) before saying done
            durable.sync_files([], [self._final.parent])
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
        return (self.manifest is not None and (self._url is not None or self._path == self._final)
                and len(self.manifest.done_blocks()) > 0)

    def abort(self) -> None:
        """Stop writing: blocks in flight finish (and are recorded), queued ones are dropped.

        A resumable output is kept; otherwise what this run wrote is removed (an
        older output being overwritten stays as it was).
        """
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._final is not None and not self.resumable and not (self.keep and self._path == self._final):
            _remove(self._path)
        elif self._url is not None and not self.keep and not self.resumable:
            from .remote import filesystem

            fs, root = filesystem(self._url, self._storage_options)
            fs.rm(root, recursive=True)  # what this run wrote (an overwritten store was cleared)


def _has_array(output: Any, zarr_options: dict) -> bool:
    """Whether `output` holds a zarr group with the result array ``"0"`` (a run that stopped
    before creating it has nothing to resume)."""
    import zarr

    try:
        return "0" in zarr.open_group(output, mode="r", **zarr_options)
    except Exception:  # no group (yet), or one zarr cannot read
        return False


def _remove_stale_siblings(final: Path) -> None:
    """Clear what killed runs into `final` left beside it: temporaries of an overwrite run or
    of a new output's creation (removed), and an old output moved aside while its
    replacement was swapped in (put back when `final` is missing, else removed)."""
    for stale in [*final.parent.glob(f".{final.name}.*.tmp"), *final.parent.glob(f"..{final.name}.*.tmp")]:
        _remove(stale)
    for old in final.parent.glob(f".{final.name}.*.old"):
        if final.exists():
            _remove(old)
        else:
            old.rename(final)


def _remove_partial_writes(path: Path) -> None:
    """Remove the temporaries zarr writes a chunk into before renaming it (``*.partial``)
    that a killed run left in a local output; a resumed run rewrites those chunks."""
    for partial in path.rglob("*.partial"):
        partial.unlink(missing_ok=True)


def _store_has_group(store: Any, storage_options: Optional[dict] = None) -> bool:
    import zarr

    options = {}
    if is_url(store):
        options["storage_options"] = filesystem_options(storage_options)
    try:
        zarr.open_group(store, mode="r", **options)
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
