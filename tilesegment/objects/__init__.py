"""Whole objects from a label map: instance ids across chunks, a table, QuPath GeoJSON.

`label_objects` finds the connected components of each class of a label map
chunk by chunk and joins them across chunk faces (see `tilesegment._components`),
so the instance labels equal ``scipy.ndimage.label`` of the whole map, class
by class, in memory bounded by a band of chunks plus a table that grows with
the number of objects. Objects are numbered 1..N by their first pixel in
raster order (row-major), so the numbering is deterministic and the same on a
cluster as locally. Chunk steps (`tilesegment.steps`) may then run over the
numbered objects.

The rooms: `input` reads the map, `passes` labels, numbers and writes it,
`export` is the result (table, outlines, GeoJSON).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .._components import Tally
from ..contracts import ChunkStep
from ..errors import UsageError
from ..io.lock import OutputLock, lock_location
from ..io.ngff import read_ome, write_ome
from ..options import InstanceRecipe
from ..report import Cancel, Reporter, as_reporter
from ..steps import chain, chunk_regions, get_step, map_overlap
from ..tasks import TaskRunner, task_runner
from .export import Objects
from .grow import Grow, relative_spacing
from .input import DEFAULT_CHUNK, Input, check_classes, open_input
from .passes import ChunkTask, MeasureIds, check_outputs, chunk_edge, finish_sink, measure, open_sink, write

__all__ = ["label_objects", "Objects", "Grow", "write_class_names", "DEFAULT_CHUNK"]


def label_objects(
    labels: Any,
    output: Union[None, str, os.PathLike, Any] = None,
    *,
    classes: Optional[Sequence[int]] = None,
    connectivity: int = 1,
    grow: float = 0,
    grow_into: Optional[Sequence[int]] = None,
    spacing: Optional[Sequence[float]] = None,
    probabilities: Any = None,
    class_names: Union[None, Sequence[str], dict] = None,
    chunks: Union[None, int, Sequence[int]] = None,
    overwrite: bool = False,
    progress: Union[bool, Callable[[int, int], Any], Reporter] = True,
    client: Any = None,
    cancel: Cancel = None,
    steps: Sequence[Union[str, ChunkStep]] = (),
) -> Objects:
    """Find whole objects in a label map: connected components per class, across chunks.

    Parameters
    ----------
    labels : path, zarr group or array, numpy or dask array
        The OME-Zarr written by `segment` (labels; or probabilities/logits,
        read as their argmax), or any 2-D (Y, X) or 3-D (Z, Y, X) integer map.
    output : None, path or zarr store
        Where the instance labels go. None: into a `segment` output as the
        NGFF label image ``labels/objects`` (pyramid and image-label metadata,
        so napari shows it over the image); for arrays, into memory (numpy).
    classes : sequence of int, optional
        Classes whose components are objects. Components of different classes
        are always different objects. Default: when no growth is asked for
        either, the instance recipe a segment output recorded (the model's:
        seeds, growth; see `tilesegment.options.InstanceRecipe`), else every
        class except 0.
    connectivity : int
        1 (face neighbours, as ``scipy.ndimage.label``) up to the number of
        axes (all neighbours, diagonals included).
    grow : float
        With ``k > 0``, grow the objects (then seeds: e.g. nucleus interiors)
        by at most `k` pixels into `grow_into`: each pixel of those classes
        that is not part of an object takes the id of the object whose
        nearest pixel is within Euclidean distance ``<= k``; of several, the
        nearest, then the smallest id; farther than `k` from all, it stays 0.
        Exact for any chunking (`tilesegment.objects.grow`).
    grow_into : sequence of int, optional
        The classes grown into (e.g. a nucleus-boundary class); needed with `grow`.
    spacing : sequence of float, optional
        Pixel size per axis for `grow`'s distances (only ratios matter; `k`
        counts pixels of the finest axis). Default: the map's recorded pixel
        size, else 1 per axis.
    probabilities : path or array, optional
        (C, Y, X) class probabilities of the same run, for a labels map: adds
        the mean probability of each object's class to the table.
    class_names : sequence or dict, optional
        Name per class value, for the table and the GeoJSON classification
        (default: those recorded in the segment output by the CLI and
        `write_class_names`, else "class K").
    chunks : int or tuple, optional
        Processing chunk edge (default: the stored chunks, joined up to about
        a megapixel; 1024 for numpy maps).
    overwrite : bool
        Replace existing instance labels.
    progress : bool, callable or Reporter
        As in `segment`: a bar, none, a callable ``(done, total)`` counting
        chunk steps (each chunk is labelled, then written: 2 per chunk, 3
        with `steps`), or a `tilesegment.report.Reporter`.
    client : dask.distributed.Client, optional
        Label chunks as tasks on this cluster (the map and the output must be
        zarr paths all workers reach). The result equals a local run's.
    cancel : threading.Event or callable, optional
        As in `segment`: stops the pass between chunks while they are
        labelled, with `Cancelled`; nothing is written then, and the segment
        output is left as it was. Writing, the second half (with the steps),
        is not cancelled once begun.
    steps : sequence of ChunkStep or str
        Post-processing of the instance labels, in order, after the
        numbering (and the growth): `ChunkStep` objects, or names
        registered in `tilesegment.registry.steps`. Their result replaces
        the numbered labels in the output (the numbered map is kept
        meanwhile in a scratch array of the output, deleted at the end).
        After growth or steps the objects are measured again, as written:
        the table, outlines and GeoJSON describe the final labels.

    Returns
    -------
    Objects
        ``.labels`` (ids 1..N in raster order of each object's first pixel,
        0 background), ``.table``, ``.to_geojson()``, ``.to_table()``.

    Raises
    ------
    InputError
        Not a labels image (float or RGB data, wrong number of axes).
    UsageError
        A class out of range, a bad connectivity, `grow` without
        `grow_into` (or the reverse), an unknown step.
    OutputExistsError
        Instance labels already there, without `overwrite`.
    OutputBusyError
        Another live run writes the map (a segment run) or where the labels
        go (another objects pass). The pass holds that lock itself while it
        writes (`tilesegment.io.lock`): the segment output for
        ``labels/objects``, else `output`.

    Examples
    --------
    >>> import numpy as np, tilesegment as ts
    >>> objs = ts.label_objects(np.array([[1, 1, 0, 2], [0, 0, 0, 2], [1, 0, 1, 1]]), progress=False)
    >>> objs.labels
    array([[1, 1, 0, 2],
           [0, 0, 0, 2],
           [3, 0, 4, 4]], dtype=uint32)
    >>> objs.table[["id", "class", "area"]].values.tolist()
    [[1, 1, 2], [2, 2, 2], [3, 1, 1], [4, 1, 2]]
    """
    _refuse_busy(labels, output)  # before reading a map that a live run is still writing
    inp = open_input(labels, chunks, probabilities)
    _refuse_busy(inp.group_path)
    if class_names is not None:
        names = class_names if isinstance(class_names, dict) else dict(enumerate(class_names))
        inp.names = {**inp.names, **{int(k): str(v) for k, v in names.items()}}
    if not isinstance(connectivity, (int, np.integer)) or not 1 <= connectivity <= inp.ndim:
        raise UsageError(f"connectivity {connectivity!r} must be 1 (face neighbours) to {inp.ndim} "
                         f"(all neighbours) for a {inp.ndim}-D map")
    recipe = None
    if classes is None and not grow and grow_into is None and inp.recipe:
        recipe = InstanceRecipe.from_dict(inp.recipe, f"the instance recipe recorded in {inp.group_path}")
        classes, grow, grow_into = recipe.classes, recipe.grow, recipe.grow_into or None
    wanted = check_classes(inp, classes)
    into = _grow_into(inp, grow, grow_into)
    growth = None
    if into:
        growth = Grow(float(grow), spacing=relative_spacing(spacing if spacing is not None else inp.pixel_size,
                                                            inp.ndim))
    steps = tuple(get_step(s) for s in steps)
    where = check_outputs(inp, output, overwrite)
    if client is not None and where is None:
        raise UsageError("a distributed run writes the instance labels to a zarr path the workers share; "
                         "pass a segment output or output=PATH")
    workers = max(1, min(4, os.cpu_count() or 1))
    reporter = as_reporter(progress, cancel, unit="chunk")
    stepped = 0 if growth is None and not steps else len(chunk_regions(inp.shape, chunk_edge(inp)))
    reporter.start(2 * inp.grid.n_chunks + stepped, "objects")  # label every chunk, write it, step it
    target = inp.group_path if where == "group" else where
    lock = None if target is None or lock_location(target) is None else OutputLock(target, command="objects")
    try:
        with lock if lock is not None else contextlib.nullcontext():
            runner = task_runner(client, workers)
            task = ChunkTask(inp, wanted, int(connectivity), into, keep=not runner.remote)
            objs = _label_and_write(task, growth, steps, where, overwrite, runner, reporter)
        objs.recipe = recipe
        return objs
    finally:
        reporter.close()


def _refuse_busy(*targets: Any) -> None:
    """Raise `OutputBusyError` if a live run writes one of `targets` (paths or URLs; others pass)."""
    for target in targets:
        if target is not None and lock_location(target) is not None:
            OutputLock(target).check()


def _grow_into(inp: Input, grow: Any, grow_into: Optional[Sequence[int]]) -> tuple[int, ...]:
    """The classes to grow into (empty: no growth), checked against `grow`."""
    if isinstance(grow, bool) or not isinstance(grow, (int, float, np.integer, np.floating)) or not grow >= 0:
        raise UsageError(f"grow {grow!r} must be a distance in pixels >= 0, e.g. 3")
    if grow == 0:
        if grow_into is not None:
            raise UsageError("grow_into names the classes objects grow into; also pass grow=K (pixels), e.g. 3")
        return ()
    if grow_into is None:
        raise UsageError(f"grow={grow:g} needs grow_into=CLASSES, the classes objects grow into "
                         "(e.g. a boundary class)")
    return check_classes(inp, grow_into)


def _label_and_write(task: ChunkTask, growth: Optional[Grow], steps: tuple, where: Any, overwrite: bool,
                     runner: TaskRunner, reporter: Reporter) -> Objects:
    inp = task.input
    merged, kept = measure(task, runner, reporter)
    dtype = merged.lookups[0].dtype if merged.lookups else np.dtype(np.uint32)
    if growth is not None:
        growth = Grow(growth.k, dtype, growth.spacing)
    step = chain(((growth,) if growth is not None else ()) + steps)
    names = () if step is None else tuple(s.name for s in getattr(step, "steps", (step,)))
    final = Tally()
    after = {"runner": runner, "reporter": reporter, "measure": MeasureIds(inp), "collect": final.add}
    if where is None:
        result = np.zeros(inp.shape, dtype)
        write(task, merged, result, runner, reporter, kept)
        if step is None:
            return Objects(result, merged, inp)
        result = map_overlap(step, result, np.zeros(inp.shape, step.dtype), chunk_edge(inp), **after)
        return Objects(result, final.finish(merged.classes), inp, names)
    sink = open_sink(inp, where, dtype if step is None else step.dtype, overwrite, runner.workers)
    sink.keep = runner.remote  # other processes write into it
    try:
        if step is None:
            write(task, merged, sink.writer(), runner, reporter, kept)
        else:
            numbered = sink.scratch("numbered", dtype)
            write(task, merged, numbered, runner, reporter, kept)
            map_overlap(step, numbered, sink.writer(), **after)
            merged = final.finish(merged.classes)
    except BaseException:
        sink.abort()
        raise
    return Objects(finish_sink(sink, where), merged, inp, names)


def write_class_names(output: Union[str, os.PathLike], names: Sequence[str]) -> None:
    """Record class names in a segment output (``tilesegment.classes``, and the
    ``image-label`` properties of label images that have them).

    `label_objects` reads them back for the table and the GeoJSON classification.

    Parameters
    ----------
    output : path
        A segment output (OME-Zarr group), NGFF 0.5 or 0.4.
    names : sequence of str
        The name of each class value, from 0.
    """
    import zarr

    group = zarr.open_group(output, mode="r+")
    names = [str(name) for name in names]
    group.attrs["tilesegment"] = {**dict(group.attrs.get("tilesegment", {})), "classes": names}
    ome = read_ome(group)
    if "image-label" in ome:
        label = dict(ome["image-label"])
        label["properties"] = [{"label-value": k, "class": name} for k, name in enumerate(names)]
        write_ome(group, {**ome, "image-label": label})
