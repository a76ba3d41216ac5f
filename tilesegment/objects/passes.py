"""The two passes of `label_objects`, and where their labels go.

**Measure.** Each chunk is labelled alone and measured (`measure_chunk`);
the `Merger` joins the pieces across chunk faces as the results come in, in
any order, and numbers the objects. Only this pass can be cancelled: it
writes nothing.

**Write.** Each chunk's component map is mapped through its lookup table to
object ids, then written once, whole. On threads the measure pass keeps the
component maps compressed in memory (lz4, about 0.2 MB per megapixel of
nuclei) up to `KEEP_BYTES`; chunks beyond that, and every chunk on a
cluster, are labelled again, which costs more than the decompression but no
memory. Once begun the pass finishes: half an objects output (and its entry
in ``labels/``) would be worse than the seconds it takes to finish.

Both passes are tasks on a `tilesegment.tasks.TaskRunner`, threads here or
a dask cluster, through the same code. The functions a task runs are at
module level and get plain, picklable values (`ChunkTask`, zarr arrays).
"""

from __future__ import annotations

import os
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from numcodecs import Blosc

from .._components import Merged, Merger, label_chunk, measure_chunk, measure_ids, object_ids
from ..contracts import Reporter
from ..errors import Cancelled, OutputExistsError, UsageError
from ..io.ngff import read_ome, write_ome
from ..report import progress_of
from ..tasks import TaskRunner, chunk_groups
from .input import Input

#: Bytes of compressed chunk component maps the measure pass keeps for the write pass.
KEEP_BYTES = 256 << 20

# Component maps are int32 with few distinct values per neighbourhood: lz4 with byte shuffle
# packs a megapixel of nuclei into about 0.2 MB in 2 ms and unpacks it in 1 ms.
_LZ4 = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)

__all__ = ["KEEP_BYTES", "ChunkTask", "MeasureIds", "measure", "write", "check_outputs", "open_sink", "finish_sink", "chunk_edge"]


@dataclass(frozen=True)
class ChunkTask:
    """What a chunk task needs (plain and picklable)."""

    input: Input
    classes: Optional[tuple[int, ...]]
    connectivity: int
    grow_into: tuple[int, ...] = ()  # classes whose pixels outside objects are marked to be grown into
    keep: bool = False  # hand the component maps, compressed, to the write pass (threads only)

    def _classes(self, labels: np.ndarray):
        return self.classes if self.classes is not None else self.input.classes_in(labels)

    def measure(self, flat: int) -> tuple[Any, Optional[bytes]]:
        """The chunk's `ChunkResult`, and its component map compressed when `keep` is set."""
        labels, prob = self.input.read(flat)
        result, local = measure_chunk(flat, self.input.grid, labels, prob, self._classes(labels),
                                      self.connectivity)
        return result, (_LZ4.encode(local) if self.keep and result.n else None)

    def instances(self, flat: int, lookup: np.ndarray, kept: Optional[bytes] = None) -> np.ndarray:
        """The chunk's object ids, from its kept component map or labelled again; with
        `grow_into`, the pixels to grow into hold the largest value of the dtype (`Grow.mark`)."""
        shape = tuple(r.stop - r.start for r in self.input.grid.region(flat))
        if kept is not None and not self.grow_into:  # growth needs the classes: read them anyway
            labels = np.zeros(0, np.uint8)
            local = np.frombuffer(_LZ4.decode(kept), np.int32).reshape(shape)
        else:
            labels, _ = self.input.read(flat)
            local = (np.frombuffer(_LZ4.decode(kept), np.int32).reshape(shape) if kept is not None
                     else label_chunk(labels, self._classes(labels), self.connectivity)[0])
        return object_ids(local, lookup, labels, self.grow_into).reshape(shape[3 - self.input.ndim:])


@dataclass(frozen=True)
class MeasureIds:
    """Measures a chunk of final object ids with the class map and probabilities under it
    (`tilesegment.steps.map_overlap`'s ``measure``: runs in the task, picklable)."""

    input: Input

    def __call__(self, region: tuple[slice, ...], ids: np.ndarray) -> dict:
        labels, prob = self.input.read_region(region)
        lead = 3 - self.input.ndim
        # class votes index a table by class value: only for class maps of small unsigned values
        small = labels.dtype.kind == "u" and (labels.dtype.itemsize == 1 or int(labels.max(initial=0)) < 256)
        return measure_ids(ids.reshape(labels.shape), (0,) * lead + tuple(r.start for r in region),
                           (1,) * lead + self.input.shape, prob, labels if small else None)


def _measure_chunks(task: ChunkTask, chunks: list[int]) -> list:
    return [task.measure(i) for i in chunks]


def _write_chunks(task: ChunkTask, dest: Any, chunks: list[tuple[int, np.ndarray, Optional[bytes]]]) -> int:
    for flat, lookup, kept in chunks:
        dest[task.input.grid.region(flat)[3 - task.input.ndim:]] = task.instances(flat, lookup, kept)
    return len(chunks)


def _advance(reporter: Reporter, n: int) -> None:
    """Count `n` chunks labelled; stop the pass if the caller cancelled it."""
    reporter.advance(n)
    if reporter.cancelled():
        done = progress_of(reporter)
        stopped = f"objects pass cancelled {done} chunk steps" if done else "objects pass cancelled"
        raise Cancelled(f"{stopped}; no objects were written")


def measure(task: ChunkTask, runner: TaskRunner, reporter: Reporter) -> tuple[Merged, dict]:
    """Label and measure every chunk, join the pieces, number the objects; cancellable between chunks.

    Returns the objects and the compressed component maps kept (chunk -> bytes, up to `KEEP_BYTES`).
    """
    grid = task.input.grid
    merger = Merger(grid, task.connectivity)
    groups = chunk_groups(grid.n_chunks, runner)
    kept: dict[int, bytes] = {}
    room = KEEP_BYTES
    # Threads take the chunks in raster order, a few at a time, so the merger holds the
    # shells of about a band of chunks.
    with closing(runner.map(_measure_chunks, groups, (task,), name="tilesegment-objects-label")) as done:
        for _, results in done:
            for result, packed in results:
                merger.add(result)
                if packed is not None and len(packed) <= room:
                    kept[result.index] = packed
                    room -= len(packed)
            _advance(reporter, len(results))
    return merger.finish(), kept


def write(task: ChunkTask, merged: Merged, dest: Any, runner: TaskRunner, reporter: Reporter,
          kept: Optional[dict] = None) -> None:
    """Write the object ids of every chunk into `dest` (numpy, or a zarr array the tasks reach),
    from the component maps `measure` kept (each is let go once handed over)."""
    kept = {} if kept is None else kept
    groups = [[(i, merged.lookups[i], kept.pop(i, None)) for i in group]
              for group in chunk_groups(task.input.grid.n_chunks, runner)]
    with closing(runner.map(_write_chunks, groups, (task, dest), name="tilesegment-objects-write")) as done:
        for _, n in done:
            reporter.advance(n)


def chunk_edge(inp: Input) -> tuple[int, ...]:
    """The processing chunk edge per spatial axis (the stored chunks of the output)."""
    return tuple(e[1] - e[0] for e in inp.grid.edges)[3 - inp.ndim:]


def _objects_path(inp: Input) -> Path:
    return inp.group_path / "labels" / "objects"


def check_outputs(inp: Input, output: Any, overwrite: bool) -> Any:
    """Where the instance labels go: "group", a path/store, or None (memory); refuse what
    must not be written to before any work."""
    from ..io.sinks import ZarrSink

    if output is not None:
        ZarrSink.check_output(output, overwrite)
        return output
    if inp.group_path is not None:
        where = str(inp.group_path)
        if not inp.ours:
            raise UsageError(f"{where!r} was not written by tilesegment segment, so it is left as it is; "
                             "pass output= (CLI: --output OBJECTS.zarr) to write the objects elsewhere")
        if inp.read_only or not os.access(inp.group_path, os.W_OK):
            raise UsageError(f"{where!r} is read-only; pass output= (CLI: --output OBJECTS.zarr) to write "
                             "the objects elsewhere")
        target = _objects_path(inp)
        if target.exists() and not overwrite:
            raise OutputExistsError(f"{str(inp.group_path)!r} already has objects ({target.name} in labels/); "
                                    "pass overwrite=True (CLI: --overwrite) to label them again")
        return "group"
    return None


def _labels_group(inp: Input) -> None:
    """Create ``labels/`` in the image group, in its NGFF version, and list ``objects`` in it."""
    import zarr

    zarr_format = 3 if inp.ngff == "0.5" else 2
    root = zarr.open_group(inp.group_path / "labels", mode="a", zarr_format=zarr_format)
    ome = read_ome(root)
    names = list(ome.get("labels", []))
    if "objects" not in names:
        names.append("objects")
    version = {"version": "0.5"} if inp.ngff == "0.5" else {}
    write_ome(root, {**version, **ome, "labels": names})


def open_sink(inp: Input, where: Any, dtype: np.dtype, overwrite: bool, writers: int):
    """The `ZarrSink` of the instance labels: in ``labels/objects`` of a segment output, or at `where`."""
    from ..io.sinks import ZarrSink

    target = _objects_path(inp) if where == "group" else where
    if where == "group":
        _labels_group(inp)
    names = ("y", "x") if inp.ndim == 2 else ("z", "y", "x")
    # In labels/ of a segment output the objects are an NGFF label image of it; written
    # elsewhere, a plain image (an image-label root is read as the label of an image two
    # folders up, which napari-ome-zarr then creates).
    inside = where == "group"
    return ZarrSink(target, inp.shape, dtype, chunk_edge(inp), overwrite=overwrite, pixel_size=inp.pixel_size,
                    writers=writers, labels=1 if inside else None, label_image=inside, dimension_names=names,
                    ngff=inp.ngff if inside else "0.5", fast=True, nearest=True)


def finish_sink(sink: Any, where: Any) -> Any:
    """Close the sink (pyramid, NGFF metadata); point the label image at its image."""
    import zarr

    from ..io import durable

    array = sink.close()  # opened read-only
    if where == "group":
        folder = Path(array.store.root)  # labels/objects, where an overwrite was swapped in
        group = zarr.open_group(array.store.with_read_only(False), mode="r+")
        ome = read_ome(group)
        write_ome(group, {**ome, "image-label": {**ome.get("image-label", {}), "source": {"image": "../../"}}})
        # labels/objects, labels/ (which lists it) and the image group (which holds labels/)
        for metadata in (folder, folder.parent, folder.parent.parent):
            durable.sync_metadata(metadata)
    return array
