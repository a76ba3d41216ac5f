"""The napari plugin in a real viewer (Qt on Xvfb, started by pytest-xvfb).

Skipped, with the reason, where Qt or OpenGL cannot start; test_napari.py
covers the logic without them. With ``TILESEGMENT_SCREENSHOTS=DIR`` the
tests save the screenshots of docs/napari.md there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import tilesegment as ts
from tilesegment.io.manifest import Manifest
from tilesegment.testing import assert_labels_match

from conftest import small_unet

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

_PROBE = """
import sys
from qtpy.QtWidgets import QApplication
from qtpy.QtGui import QOpenGLContext
app = QApplication(sys.argv)
context = QOpenGLContext()
sys.exit(0 if context.create() else 3)
"""


def _qt_problem() -> str:
    """Why a viewer cannot start here ("" when it can), asked of a child process: a Qt that
    cannot reach a display aborts its process."""
    try:
        import qtpy  # noqa: F401
    except Exception as exc:  # no binding: qtpy raises its own error type
        return f"no Qt binding ({exc})"
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "Qt did not start within 60 s"
    if done.returncode:
        lines = (done.stderr or "no message").strip().splitlines()
        return f"Qt/OpenGL cannot start (DISPLAY={os.environ.get('DISPLAY')!r}): {lines[-1] if lines else ''}"
    return ""


_PROBLEM = _qt_problem()
pytestmark = pytest.mark.skipif(bool(_PROBLEM), reason=_PROBLEM)
SHOTS = os.environ.get("TILESEGMENT_SCREENSHOTS")


def _shot(name: str, grab) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        grab(str(Path(SHOTS) / name))


@pytest.fixture
def widget(make_napari_viewer, tmp_path):
    from tilesegment.napari._widget import SegmentWidget

    viewer = make_napari_viewer(show=bool(SHOTS))
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w, name="tilesegment")
    w.folder.value = tmp_path
    return viewer, w


def _wait(qtbot, w, timeout=120_000):
    qtbot.waitUntil(lambda: w.run_button.enabled, timeout=timeout)


def _full(layer):
    """A layer's full-resolution data, multiscale or not."""
    return layer.data[0] if layer.multiscale else layer.data


def _tiny_model(tmp_path):
    return ts.save_model(small_unet(num_classes=3), tmp_path / "tiny.pt")


def test_segments_the_sample_into_lazy_multiscale_labels_with_objects(widget, qtbot):
    import dask.array as da

    from tilesegment.napari import he_slide

    viewer, w = widget
    (rgb, kwargs, _), = he_slide(size=1280)  # over 1024 px: the result has a pyramid
    layer = viewer.add_image(rgb, **kwargs)
    w.image.value = layer
    w.folder.value = w.folder.value / "results"  # not there yet: the widget makes it
    w.tile_size.value = "256"
    w.objects.value = True
    _shot("napari_widget.png", lambda p: w.native.grab().save(p))
    if SHOTS:  # the run in napari's activity dock, at its first report
        viewer.window._status_bar._toggle_activity_dock(True)
        show = w._progress

        def shoot_once(report):
            show(report)
            if not Path(SHOTS, "napari_progress.png").exists():
                qtbot.wait(200)
                viewer.window._qt_window.grab().save(str(Path(SHOTS, "napari_progress.png")))

        w._progress = shoot_once
    w.run()
    _wait(qtbot, w)
    classes, objects = w.added
    assert classes.multiscale and objects.multiscale
    assert all(isinstance(level, da.Array) for level in [*classes.data, *objects.data])
    assert_labels_match(np.asarray(classes.data[0]), ts.segment(rgb, "demo", tile_size=256, mode="logits",
                                                                 progress=False))
    assert list(classes.scale) == [0.5, 0.5]
    _shot("napari_segmented.png", lambda p: viewer.screenshot(p, canvas_only=False))
    assert len(objects.features) == len(np.unique(np.asarray(objects.data[0]))) - 1 > 10
    assert "objects" in w.status.value


def test_a_shapes_roi_of_a_multiscale_dask_layer_is_exact_and_in_place(widget, qtbot, tmp_path):
    import dask.array as da

    from tilesegment.napari import he_slide

    viewer, w = widget
    (rgb, _, _), = he_slide(size=768, seed=2)
    pyramid = [da.from_array(rgb, chunks=(256, 256, 3)), da.from_array(rgb[::2, ::2], chunks=(256, 256, 3))]
    layer = viewer.add_image(pyramid, multiscale=True, rgb=True, scale=(0.5, 0.5), translate=(100, 50))
    y0, x0, y1, x1 = 201, 333, 420, 512
    world = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]]) * 0.5 + [100, 50]
    viewer.add_shapes([world], shape_type="polygon", name="roi")
    w.image.value = layer
    w.scope.value = "shapes ROI"
    w.shapes.value = viewer.layers["roi"]
    w.model.value, w.model_file.value = "file", _tiny_model(tmp_path)
    w.run()
    _wait(qtbot, w)
    (classes,) = w.added
    whole = ts.segment(rgb, small_unet(num_classes=3), tile_size=64, mode="logits", progress=False)
    assert_labels_match(np.asarray(_full(classes)), whole[:, y0:y1 + 1, x0:x1 + 1])
    np.testing.assert_allclose(classes.data_to_world([0, 0]), [y0 * 0.5 + 100, x0 * 0.5 + 50])


def test_cancel_stops_within_a_batch_and_run_continues_to_the_same_result(widget, qtbot, tmp_path):
    viewer, w = widget
    rgb = np.random.default_rng(0).integers(0, 256, (2048, 2048, 3), dtype=np.uint8)
    w.image.value = viewer.add_image(rgb, rgb=True, name="noise")
    w.model.value, w.model_file.value = "file", _tiny_model(tmp_path)
    w.tile_size.value = "256"  # 64 tiles in four 1024-px blocks
    seen, clicked, show = [], [], w._progress

    def cancel_after_a_block(report):  # as a click on Cancel once the first block is written
        seen.append(report.done)
        if report.done >= 20 and not clicked:
            clicked.append(len(seen))
            w.cancel()
        show(report)

    w._progress = cancel_after_a_block
    w.run()
    _wait(qtbot, w)
    assert "cancelled" in w.status.value and w.added == []
    # no batch starts after the click; the ones already computed are kept: up to three in the
    # engine's pipeline (tests/test_resume.py), and one more finished while the report travelled
    # to the GUI thread
    assert len(seen) - clicked[0] <= 4 and seen[-1] < 64
    assert Manifest(tmp_path / "noise.zarr").exists  # a resumable partial run
    w._progress = show
    w.run()
    _wait(qtbot, w)
    (classes,) = w.added
    assert_labels_match(np.asarray(_full(classes)), ts.segment(rgb, small_unet(num_classes=3), tile_size=256,
                                                                mode="logits", progress=False))


def test_a_dask_layer_is_read_by_the_tile_never_whole(widget, qtbot, tmp_path):
    import dask.array as da

    viewer, w = widget

    def tile(block_info=None):
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        return np.random.default_rng(y0 * 7 + x0).integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)

    # 16384 x 4096 (201 MB): reading keeps a band of source chunks across the width (decode-once
    # reading), so a tall image shows a whole-image load (>= 201 MB) clearly apart from the band
    image = da.map_blocks(tile, chunks=((1024,) * 16, (1024,) * 4, (3,)), dtype=np.uint8)
    w.image.value = viewer.add_image(image, rgb=True, name="lazy", contrast_limits=(0, 255))
    w.model.value, w.model_file.value = "file", _tiny_model(tmp_path)
    w.tile_size.value = "512"
    tracemalloc.start()
    try:
        w.run()
        _wait(qtbot, w)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(w.added) == 1
    assert peak < image.nbytes / 2, f"peak {peak / 1e6:.0f} MB of Python/numpy memory for a {image.nbytes / 1e6:.0f} MB image"


def test_reader_in_the_viewer_and_objects_coloured_by_area(make_napari_viewer, tmp_path):
    import tifffile
    from napari.utils.colormaps import DirectLabelColormap

    from tilesegment.cli import main
    from tilesegment.napari import he_slide
    from tilesegment.napari._widget import ColourObjects

    (rgb, _, _), = he_slide(size=1280, seed=4)  # over 1024 px: the result has a pyramid
    slide = tmp_path / "he.tif"
    tifffile.imwrite(slide, rgb, tile=(256, 256), photometric="rgb", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")
    out = tmp_path / "he.zarr"
    assert main(["segment", str(slide), str(out), "--objects", "--quiet"]) == 0
    viewer = make_napari_viewer(show=bool(SHOTS))
    layers = viewer.open(str(out), plugin="tilesegment")
    assert [type(layer).__name__ for layer in layers] == ["Image", "Labels", "Labels"]
    image, classes, objects = layers
    assert image.rgb and classes.multiscale and objects.multiscale
    assert "area" in objects.features and len(objects.features) > 10
    _shot("napari_result.png", lambda p: viewer.screenshot(p, canvas_only=True))
    colour = ColourObjects(viewer)
    colour.layer.value = objects
    colour.column.reset_choices()
    colour.column.value = "area"
    colour._apply()
    assert isinstance(objects.colormap, DirectLabelColormap)
    big, small = objects.features.sort_values("area")["id"].iloc[[-1, 0]]
    assert tuple(objects.colormap.color_dict[big]) != tuple(objects.colormap.color_dict[small])
    classes.visible = False
    _shot("napari_objects_by_area.png", lambda p: viewer.screenshot(p, canvas_only=True))


def test_bad_fields_are_a_one_line_notification(widget, monkeypatch):
    import napari.utils.notifications as notifications

    viewer, w = widget
    said = []
    monkeypatch.setattr(notifications, "show_error", said.append)
    w.run()  # no image, no file
    assert said == ["choose an image layer or a file to segment"] and w.run_button.enabled
    w.file.value = str(Path(__file__))
    w.scope.value = "current view"
    w.run()
    assert "need an image layer" in said[-1]
