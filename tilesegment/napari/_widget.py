"""The segment widget: a slide, a layer or a region of it segmented out of core from napari.

The run is `tilesegment.napari._run.run_request` on a napari ``thread_worker``:
progress goes to napari's activity bar, Cancel stops it between batches
(the output stays resumable, and the next Run continues it), and the result
opens lazily, as the reader opens it, aligned with the input layer. Errors
are napari notifications carrying the engine's one-line message.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, PushButton, create_widget

from ._run import Progress, Request, levels_in_box, run_request

if TYPE_CHECKING:
    import napari

__all__ = ["SegmentWidget", "ColourObjects", "DEFAULT_FOLDER"]

#: Where results go unless the widget is told otherwise.
DEFAULT_FOLDER = Path.home() / "tilesegment"
SCOPES = ("whole image", "current view", "shapes ROI")
TILE_SIZES = ("auto", "256", "512", "1024", "2048")


def _devices() -> list[str]:
    import torch

    return ["auto", "cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


class SegmentWidget(Container):
    """Segment an Image layer, a region of it, or a slide file, into OME-Zarr; show the result.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer this widget is docked in (napari passes it).
    """

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        import napari

        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.image = create_widget(annotation=napari.layers.Image, label="image", options={"nullable": True})
        self.file = FileEdit(label="or file", mode="r", nullable=True,
                             tooltip="a slide or volume file, read out of core (takes precedence over the layer)")
        self.scope = ComboBox(label="scope", choices=SCOPES, value=SCOPES[0])
        self.shapes = create_widget(annotation=napari.layers.Shapes, label="ROI shapes",
                                    options={"nullable": True})
        self.model = ComboBox(label="model", choices=("demo (H&E nuclei)", "file"), value="demo (H&E nuclei)")
        self.model_file = FileEdit(label="model file", mode="r", nullable=True,
                                   tooltip="checkpoint (.pt), TorchScript, ONNX or bioimage.io package")
        self.device = ComboBox(label="device", choices=_devices(), value="auto")
        self.tile_size = ComboBox(label="tile size", choices=TILE_SIZES, value="auto")
        self.folder = FileEdit(label="output folder", mode="d", value=DEFAULT_FOLDER)
        self.objects = CheckBox(label="objects", value=False, tooltip="number whole objects and write their table")
        self.overwrite = CheckBox(label="overwrite", value=False, tooltip="replace an earlier result of this name")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.extend([self.image, self.file, self.scope, self.shapes, self.model, self.model_file, self.device,
                     self.tile_size, self.folder, self.objects, self.overwrite, self.run_button,
                     self.cancel_button, self.status])
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self._cancel: Optional[threading.Event] = None
        self._bars: dict[str, Any] = {}
        self._placement: dict = {}
        self.worker: Any = None  # the running thread_worker, for tests and other front-ends
        self.added: list = []  # the layers the last run added

    # -- what to run -----------------------------------------------------------------------

    def request(self) -> Request:
        """The run the fields describe.

        Raises
        ------
        tilesegment.UsageError
            When the fields do not make a run (no image, no ROI shapes, ...).
        """
        from ..errors import UsageError

        layer, file = self.image.value, self.file.value
        if file is not None and str(file) not in ("", "."):
            if self.scope.value != SCOPES[0]:
                raise UsageError("'current view' and 'shapes ROI' need an image layer; open the file in "
                                 "napari (slides open lazily) or segment the whole file")
            image, axes, name, box = str(file), None, Path(file).name.split(".")[0], None
            self._placement = {}
        elif layer is None:
            raise UsageError("choose an image layer or a file to segment")
        else:
            image, axes = _layer_image(layer)
            name, box = layer.name, self._box(layer)
            self._placement = {"scale": list(layer.scale), "translate": list(layer.translate)}
            if box is None and layer.metadata.get("path") and Path(layer.metadata["path"]).exists():
                image, axes = layer.metadata["path"], None  # decode-once reading of the file itself
        if box is not None:
            name += "_" + "_".join(f"{a}-{b}" for a, b in box)
        model: Any = "demo"
        if self.model.value == "file":
            if self.model_file.value is None or str(self.model_file.value) in ("", "."):
                raise UsageError("choose a model file, or the demo model")
            model = str(self.model_file.value)
        folder = Path(self.folder.value or DEFAULT_FOLDER)
        tile = self.tile_size.value
        return Request(image=image, output=folder / f"{_safe(name)}.zarr", model=model, axes=axes, box=box,
                       device=self.device.value, tile_size=tile if tile == "auto" else int(tile),
                       objects=bool(self.objects.value), overwrite=bool(self.overwrite.value))

    def _box(self, layer: Any) -> Optional[tuple[tuple[int, int], ...]]:
        """The region of `layer` (full-resolution pixels per spatial axis) that the scope asks for."""
        from ..errors import UsageError

        shape = _spatial_shape(layer)
        if self.scope.value == SCOPES[0]:
            return None
        if self.scope.value == SCOPES[1]:
            corners = np.asarray(layer.corner_pixels, dtype=float)
            if layer.multiscale:
                corners = corners * np.asarray(layer.downsample_factors[layer.data_level])
            lo, hi = corners[0][-len(shape):], corners[1][-len(shape):] + 1
        else:
            shapes = self.shapes.value
            if shapes is None or len(shapes.data) == 0:
                raise UsageError("draw a rectangle or polygon in a Shapes layer and choose it as the ROI")
            chosen = sorted(shapes.selected_data) or range(len(shapes.data))
            # napari's transforms take one point at a time
            points = np.array([layer.world_to_data(shapes.data_to_world(vertex))
                               for i in chosen for vertex in np.asarray(shapes.data[i])])
            points = points[:, -len(shape):]
            lo, hi = points.min(axis=0), points.max(axis=0) + 1
        box = []
        for k, n in enumerate(shape):
            if len(shape) == 3 and k == 0:  # a volume: every plane of the region
                box.append((0, n))
                continue
            a, b = int(np.clip(np.floor(lo[k]), 0, n)), int(np.clip(np.ceil(hi[k]), 0, n))
            if b <= a:
                raise UsageError("the region lies outside the image; pan to the image or move the ROI")
            box.append((a, b))
        return None if all(a == 0 and b == n for (a, b), n in zip(box, shape)) else tuple(box)

    # -- running -----------------------------------------------------------------------------

    def run(self) -> None:
        """Start the run in a thread worker (the Run button)."""
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_error

        from ..errors import TileSegmentError

        try:
            request = self.request()
            # The folder field (default ~/tilesegment) is the user's choice of where results go:
            # make it, where the engine would refuse a missing parent.
            request.output.parent.mkdir(parents=True, exist_ok=True)
        except TileSegmentError as exc:
            show_error(str(exc))
            return
        except OSError as exc:
            show_error(f"cannot create the output folder {str(exc.filename)!r}: {exc.strerror}; choose another")
            return
        self._cancel = threading.Event()
        self._request = request
        # Our own "errored" handler: without one, napari re-raises in the main thread (a
        # traceback dialog) instead of the one-line notification.
        worker = create_worker(run_request, request, self._cancel, _start_thread=False, _connect={
            "yielded": self._progress, "returned": self._show, "errored": self._failed,
            "finished": self._finished})
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = f"segmenting into {request.output}"
        self.worker = worker
        worker.start()

    def cancel(self) -> None:
        """Stop the run between batches (the Cancel button); what was saved stays resumable."""
        if self._cancel is not None:
            self._cancel.set()
            self.status.value = "cancelling after this batch"

    def _progress(self, report: Progress) -> None:
        from napari.utils import progress

        bar = self._bars.get(report.stage)
        if bar is None:
            bar = self._bars[report.stage] = progress(total=report.total, desc=f"tilesegment {report.stage}")
        bar.total = report.total
        bar.update(report.done - bar.n)

    def _show(self, result: dict) -> None:
        from napari.layers import Layer
        from napari.utils.notifications import show_info

        from ._reader import read_output

        box = result["box"]
        added = []
        for data, kwargs, kind in read_output(result["output"]):
            if kind == "image" and "channel_axis" not in kwargs:
                continue  # the source image: already in the viewer
            kwargs = dict(kwargs)
            if box is not None:
                outer, inner = box
                cut = levels_in_box(data if kwargs.get("multiscale") else [data], inner)
                data = cut if len(cut) > 1 else cut[0]
                start = [o + i for (o, _), (i, _) in zip(outer, inner)]
            else:
                start = [0] * len(kwargs.get("scale", []))
            if self._placement:  # the input layer's world: same pixels, same place
                scale = self._placement["scale"][-len(start):] if start else []
                translate = self._placement["translate"][-len(start):] if start else []
                kwargs["scale"] = scale
                kwargs["translate"] = [t + s * a for t, s, a in zip(translate, scale, start)]
            added.append(self._viewer.add_layer(Layer.create(data, kwargs, kind)))
        found = "" if result["objects"] is None else f", {result['objects']} objects"
        self.status.value = f"done: {result['output']}{found}"
        show_info(f"tilesegment: {result['output']}{found}")
        self.added = added

    def _failed(self, exc: BaseException) -> None:
        from napari.utils.notifications import show_error, show_info

        from ..errors import Cancelled, TileSegmentError

        if isinstance(exc, Cancelled):
            self.status.value = "cancelled; Run again to continue where it stopped"
            show_info(f"tilesegment: {exc}")
        elif isinstance(exc, TileSegmentError):
            self.status.value = "failed"
            show_error(f"tilesegment: {exc}")
        else:  # a bug or a system error: still one line here (the log has the traceback)
            import logging

            logging.getLogger("tilesegment").error("run failed", exc_info=exc)
            self.status.value = "failed"
            show_error(f"tilesegment: {type(exc).__name__}: {exc}")

    def _finished(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars = {}
        self.run_button.enabled, self.cancel_button.enabled = True, False
        self._cancel = None


def _layer_image(layer: Any) -> tuple[Any, str]:
    """A layer's full-resolution data (never converted to numpy) and its axes."""
    data = layer.data[0] if layer.multiscale else layer.data
    if layer.rgb:
        return data, "YXS"
    return data, "ZYX"[-data.ndim:] if data.ndim <= 3 else "TZYX"[-data.ndim:]


def _spatial_shape(layer: Any) -> tuple[int, ...]:
    data = layer.data[0] if layer.multiscale else layer.data
    return tuple(data.shape[:-1] if layer.rgb else data.shape)


def _safe(name: str) -> str:
    """A file name from a layer name."""
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return keep or "image"


class ColourObjects(Container):
    """Colour an objects layer by a column of its table (its ``features``).

    Parameters
    ----------
    napari_viewer : napari.Viewer
    """

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        import napari

        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.layer = create_widget(annotation=napari.layers.Labels, label="objects")
        self.column = ComboBox(label="colour by", choices=self._columns)
        self.colormap = ComboBox(label="colormap", choices=("viridis", "magma", "turbo", "plasma"))
        self.apply = PushButton(text="Apply")
        self.extend([self.layer, self.column, self.colormap, self.apply])
        self.layer.changed.connect(lambda *_: self.column.reset_choices())
        self.apply.changed.connect(self._apply)

    def _columns(self, *_: Any) -> list[str]:
        from ._colours import numeric_columns

        layer = self.layer.value
        return [] if layer is None else numeric_columns(layer.features)

    def _apply(self) -> None:
        from napari.utils.notifications import show_error

        from ._colours import colour_by

        if self.layer.value is None or not self.column.value:
            show_error("tilesegment: choose an objects layer with a table (features)")
            return
        colour_by(self.layer.value, self.column.value, self.colormap.value)
