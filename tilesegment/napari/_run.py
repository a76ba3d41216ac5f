"""What the segment widget runs, without Qt: the request, the region with its context, the run.

The widget (`tilesegment.napari._widget`) turns its fields into a `Request`
and hands `run_request` to a napari ``thread_worker``. Everything here is
plain Python over the public API (`prepare`, `Job.run`, `label_objects`),
so it is tested without a viewer, and a front-end other than napari can
drive it the same way.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

__all__ = ["Request", "Progress", "context_box", "run_request"]


@dataclass(frozen=True)
class Progress:
    """One progress report of a run: which pass, and how far (`done` of `total` tiles or blocks)."""

    stage: str  # "segment" or "objects"
    done: int
    total: int


@dataclass(frozen=True)
class Request:
    """One segment run asked for from a front-end.

    Attributes
    ----------
    image : path or array
        A file path (read out of core, decode-once) or a numpy/dask/zarr
        array (a layer's full-resolution data; never converted to numpy).
    output : path
        The OME-Zarr to write.
    model : str or path
        ``"demo"``, a checkpoint, TorchScript, ONNX or bioimage.io package.
    axes : str, optional
        Axes of an array image (``"YXS"`` for an RGB layer).
    box : tuple of (start, stop), optional
        Region to segment, one pair per spatial axis of the image in its
        full-resolution pixels; None for the whole image. `run_request` reads
        it with the network's context around it (`context_box`).
    device, tile_size, objects, overwrite
        As `segment` and ``segment --objects``.
    """

    image: Any
    output: Path
    model: Union[str, Path] = "demo"
    axes: Optional[str] = None
    box: Optional[tuple[tuple[int, int], ...]] = None
    device: str = "auto"
    tile_size: Union[int, str] = "auto"
    objects: bool = False
    overwrite: bool = False
    extra: dict = field(default_factory=dict)  # other `segment` keywords


def context_box(box: Sequence[tuple[int, int]], shape: Sequence[int], halo: Sequence[int],
                step: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The region to read so that `box` is segmented exactly as in the whole image.

    Each axis grows by the network's `halo` plus one `step` (clipped to the
    image) and starts at a multiple of `step`, so the crop's tiles sit on the
    whole image's pooling grid. The extra step is there because a pixel's
    receptive field is the halo on each side only on average: after pooling
    it leans by up to ``step - 1`` px to one side, depending on the pixel's
    place in the pooling grid. Every pixel of `box` then sees the same input
    as in a whole-image run: the crop's mirrored edges are beyond its reach,
    or are the image's own edges.

    >>> context_box([(100, 200)], [1000], halo=[44], step=[16])
    ((32, 260),)
    >>> context_box([(0, 50)], [60], halo=[44], step=[16])
    ((0, 60),)
    """
    out = []
    for (a, b), n, h, s in zip(box, shape, halo, step):
        if not 0 <= a < b <= n:
            raise ValueError(f"region {a}..{b} is not inside 0..{n}")
        start = max(0, a - h - s) // s * s
        out.append((start, min(n, b + h + s)))
    return tuple(out)


def _image(request: Request, halo: Sequence[int], step: Sequence[int]) -> tuple[Any, Optional[str], Optional[tuple]]:
    """What to segment: the image, its axes, and for a box, a lazy crop with its context and
    ``(outer, inner)``: the crop in the image and the box in the crop."""
    if request.box is None:
        return request.image, request.axes, None
    if isinstance(request.image, (str, Path)):
        from .. import open_image
        from ._reader import lazy_source

        source = open_image(request.image, **request.extra.get("read", {}))
        image, axes = lazy_source(source), source.plan_axes + "C"
    else:
        image, axes = request.image, request.axes
    spatial = _spatial_axes(image.ndim, axes, len(request.box))
    outer = context_box(request.box, [image.shape[i] for i in spatial], halo, step)
    index = [slice(None)] * image.ndim
    for i, (a, b) in zip(spatial, outer):
        index[i] = slice(a, b)
    inner = tuple((a - o, b - o) for (a, b), (o, _) in zip(request.box, outer))
    return image[tuple(index)], axes, (outer, inner)


def _spatial_axes(ndim: int, axes: Optional[str], n: int) -> list[int]:
    """Positions of the last `n` spatial axes of an array with `axes` (default: channels last
    when there is one more axis than `n`)."""
    if axes is None:
        axes = "YXC"[-ndim:] if ndim == n + 1 else "ZYX"[-ndim:] if ndim <= 3 else "C" + "ZYX"[-(ndim - 1):]
    positions = [i for i, a in enumerate(axes.upper()) if a in "TZYX"]
    return positions[-n:]


def run_request(request: Request, cancel: Optional[threading.Event] = None) -> Iterator[Progress]:
    """Run `request` and yield its progress; the generator's return value is what was made.

    The engine runs on a thread of its own and reports through a queue, so
    the caller's thread (napari's ``thread_worker``) only relays progress.
    Setting `cancel` stops the run between batches: `segment` raises
    `tilesegment.Cancelled` and leaves a resumable output, which the next run
    of the same request continues.

    Yields
    ------
    Progress

    Returns
    -------
    dict
        ``{"output": Path, "objects": int or None, "box": (outer, inner) or None}``
        (StopIteration.value; napari's worker passes it to ``returned``).
    """
    reports: "queue.Queue[Any]" = queue.Queue()
    done: dict = {}

    def work() -> None:
        try:
            done["result"] = _execute(request, cancel, lambda stage: (
                lambda d, t: reports.put(Progress(stage, int(d), int(t)))))
        except BaseException as exc:  # handed to the caller's thread, which raises it
            done["error"] = exc
        finally:
            reports.put(None)

    thread = threading.Thread(target=work, name="tilesegment-run", daemon=True)
    thread.start()
    while (report := reports.get()) is not None:
        yield report
    thread.join()
    if "error" in done:
        raise done["error"]
    return done["result"]


def _execute(request: Request, cancel: Optional[threading.Event],
             progress: Callable[[str], Callable[[int, int], None]]) -> dict:
    from .. import label_objects, load_model, prepare
    from ..io.manifest import Manifest
    from ..objects.export import files_beside

    model = load_model(request.model)
    image, axes, box = _image(request, model.geometry.halo, model.geometry.step)
    read = request.extra.get("read", {}) if box is None else {}
    output = Path(request.output)
    # A run this widget stopped (Cancel) is continued by the next Run with the same settings.
    resume = not request.overwrite and output.exists() and Manifest(output).exists
    job = prepare(image, model, output, axes=axes, tile_size=request.tile_size, device=request.device,
                  overwrite=request.overwrite, resume=resume, **read,
                  **{k: v for k, v in request.extra.items() if k != "read"})
    job.run(progress=progress("segment"), cancel=cancel)
    count = None
    if request.objects:
        objs = label_objects(output, overwrite=True, progress=progress("objects"), cancel=cancel)
        objs.to_table(files_beside(output)[0], overwrite=True)
        count = len(objs)
    return {"output": output, "objects": count, "box": box}


def levels_in_box(levels: Sequence[Any], inner: Sequence[tuple[int, int]]) -> list:
    """The part of each pyramid level inside `inner` (full-resolution (start, stop) per trailing
    spatial axis), each level cut at its own scale (outward, so nothing is lost)."""
    full = levels[0].shape
    out = []
    for level in levels:
        index = [slice(None)] * level.ndim
        for k, (a, b) in enumerate(inner):
            axis = level.ndim - len(inner) + k
            f = full[axis] / level.shape[axis]
            index[axis] = slice(int(a // f), min(level.shape[axis], math.ceil(b / f)))
        out.append(level[tuple(index)])
    return out
