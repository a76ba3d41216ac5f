"""The napari plugin without Qt: the reader on stores the engine wrote, the run logic, samples.

The viewer itself is exercised in test_napari_viewer.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import given, settings, strategies as st

import tilesegment as ts
from tilesegment.napari import context_box, get_reader, get_slide_reader, read_output, run_request
from tilesegment.napari._colours import numeric_columns, object_colours
from tilesegment.napari._run import Request, levels_in_box
from tilesegment.testing import assert_labels_match

from conftest import SHARED_SVS, small_unet

pytest.importorskip("napari")


def _slide(tmp_path, shape=(300, 260)):
    """A tiled, JPEG-free RGB TIFF with a pixel size (0.5 um) and one pyramid level."""
    rgb = np.random.default_rng(3).integers(0, 256, (*shape, 3), dtype=np.uint8)
    path = tmp_path / "slide.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(64, 64), photometric="rgb", subifds=1, resolution=(20000, 20000),
                  resolutionunit="CENTIMETER")
        tif.write(rgb[::2, ::2], tile=(64, 64), photometric="rgb", subfiletype=1)
    return path, rgb


@pytest.fixture
def slide(tmp_path):
    return _slide(tmp_path)


@pytest.fixture
def model(tmp_path):
    return ts.save_model(small_unet(num_classes=3), tmp_path / "m.pt", classes=["bg", "tissue", "nuclei"])


def _run(request: Request, cancel=None) -> tuple[list, dict]:
    """All progress reports of a run, and what it returned."""
    gen, reports = run_request(request, cancel), []
    while True:
        try:
            reports.append(next(gen))
        except StopIteration as stop:
            return reports, stop.value


def test_reader_claims_only_what_tilesegment_wrote(tmp_path, slide, model):
    path, _ = slide
    out = tmp_path / "out.zarr"
    ts.segment(path, model, out, tile_size=64, progress=False)
    assert get_reader(str(out)) is read_output
    assert get_reader([str(out)]) is read_output
    assert get_reader([str(out), str(out)]) is None
    assert get_reader(str(path)) is None
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").create_array("0", shape=(4, 4), dtype="u1")
    assert get_reader(str(plain)) is None  # napari-ome-zarr's to open
    assert get_reader(str(tmp_path / "missing.zarr")) is None


@pytest.mark.parametrize("ngff", ["0.5", "0.4"])
def test_reader_opens_classes_objects_table_and_source_lazily(tmp_path, model, ngff):
    import dask.array as da

    path, rgb = _slide(tmp_path, (1100, 1040))  # over 1024 px: the output has a pyramid
    out = tmp_path / "out.zarr"
    ts.segment(path, model, out, tile_size=64, chunk_size=64, ngff=ngff, progress=False)
    objs = ts.label_objects(out, classes=[2])
    objs.to_table(tmp_path / "out.objects.csv")
    layers = read_output(out)
    assert [t for _, _, t in layers] == ["image", "labels", "labels"]
    (image, ikw, _), (classes, ckw, _), (objects, okw, _) = layers
    stored = zarr.open_group(str(out), mode="r")

    # every level lazy, and the pixels those of the store
    assert all(isinstance(level, da.Array) for level in classes + objects + image)
    assert ckw["multiscale"] and okw["multiscale"] and len(classes) == len(objects) == 2
    assert ckw["scale"] == [0.5, 0.5]
    np.testing.assert_array_equal(classes[0].compute(), stored["0"][:])
    np.testing.assert_array_equal(objects[0].compute(), stored["labels/objects/0"][:])
    assert list(ckw["features"]["class"]) == ["bg", "tissue", "nuclei"]
    assert ckw["colormap"][0][3] == 0 and ckw["colormap"][2][3] == 1

    # the table rows are the objects, keyed by their id
    features = okw["features"]
    assert len(features) == len(objs) and (features["index"] == features["id"]).all()
    assert set(np.unique(objects[0].compute())) - {0} == set(features["index"])

    # the source, with its pyramid, over the same extent as the result
    assert ikw["rgb"] and ikw["name"] == "slide.tif" and len(image) == 2
    np.testing.assert_array_equal(image[0].compute(), rgb)
    np.testing.assert_array_equal(image[1].compute(), rgb[::2, ::2])
    extent = [n * s for n, s in zip(image[0].shape[:2], ikw["scale"])]
    assert extent == [n * s for n, s in zip(classes[0].shape, ckw["scale"])]


def test_reader_without_source_table_or_objects(tmp_path, slide, model):
    path, _ = slide
    out = tmp_path / "arr.zarr"
    ts.segment(np.asarray(tifffile.imread(path)), model, out, tile_size=64, progress=False)
    (data, kwargs, kind), = read_output(out)  # an array has no file to show
    # one level (under 1024 px): the array itself, as napari cannot make a one-level pyramid
    assert kind == "labels" and not kwargs["multiscale"] and data.shape == (300, 260)
    moved = tmp_path / "moved.zarr"
    ts.segment(path, model, moved, tile_size=64, progress=False)
    path.unlink()
    assert [t for _, _, t in read_output(moved)] == ["labels"]  # the slide is gone: the result still opens


def test_reader_opens_probabilities_as_one_image_per_class(tmp_path, slide, model):
    path, _ = slide
    out = tmp_path / "p.zarr"
    ts.segment(path, model, out, tile_size=64, mode="probabilities", progress=False)
    data, kwargs, kind = read_output(out)[-1]
    assert kind == "image" and kwargs["channel_axis"] == 0
    assert kwargs["name"] == ["p bg", "p tissue", "p nuclei"] and kwargs["contrast_limits"] == [0, 255]


def test_source_recorded_with_its_read_options_but_not_in_the_resume_identity(tmp_path, slide, model):
    path, _ = slide
    out = tmp_path / "l1.zarr"
    ts.segment(path, model, out, tile_size=64, level=1, progress=False)
    record = zarr.open_group(str(out), mode="r").attrs["tilesegment"]
    assert record["source"]["path"] == str(path.resolve()) and record["source"]["level"] == 1
    # level 1 was segmented: the full-resolution source still covers the same extent
    image, ikw, _ = read_output(out)[0]
    classes, ckw, _ = read_output(out)[1]  # one level: the array itself
    assert [n * s for n, s in zip(image[0].shape[:2], ikw["scale"])] == \
        [n * s for n, s in zip(classes.shape, ckw["scale"])]


@settings(max_examples=12, deadline=None)
@given(y=st.integers(0, 250), x=st.integers(0, 200), h=st.integers(1, 80), w=st.integers(1, 80),
       from_file=st.booleans())
def test_a_region_is_segmented_exactly_as_in_the_whole_image(tmp_path_factory, y, x, h, w, from_file):
    tmp = tmp_path_factory.mktemp("roi")
    rgb = np.random.default_rng(5).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    path = tmp / "s.tif"
    tifffile.imwrite(path, rgb, tile=(64, 64), photometric="rgb")
    net = small_unet(depth=2)
    model = ts.save_model(net, tmp / "m.pt")
    whole = ts.segment(rgb, net, tile_size=64, mode="logits", progress=False)
    box = ((y, min(300, y + h)), (x, min(260, x + w)))
    request = Request(image=str(path) if from_file else rgb, axes=None if from_file else "YXS",
                      output=tmp / "roi.zarr", model=str(model), box=box, tile_size=32)
    _, result = _run(request)
    outer, inner = result["box"]
    got = levels_in_box([zarr.open_array(str(tmp / "roi.zarr" / "0"), mode="r")], inner)[0][:]
    # the contract: labels are the whole image's argmax wherever that is not a near tie
    assert_labels_match(got, whole[:, box[0][0]:box[0][1], box[1][0]:box[1][1]])


def test_context_box_keeps_the_pooling_grid_and_the_image():
    assert context_box([(100, 200), (5, 6)], [1000, 10], halo=[44, 44], step=[16, 16]) == ((32, 260), (0, 10))
    with pytest.raises(ValueError, match="not inside"):
        context_box([(5, 5)], [10], halo=[1], step=[1])


def test_run_reports_progress_and_a_cancel_resumes_to_the_same_result(tmp_path, slide, model):
    path, _ = slide
    reference = tmp_path / "ref.zarr"
    # batch_size=1 in both runs: the same tiles through the same computation, so bit-identical
    reports, result = _run(Request(image=str(path), output=reference, model=str(model), tile_size=32,
                                   objects=True, extra={"batch_size": 1}))
    segment = [r for r in reports if r.stage == "segment"]
    assert segment[-1].done == segment[-1].total > 1
    assert [r.done for r in segment] == sorted(r.done for r in segment)
    assert any(r.stage == "objects" for r in reports)
    stored = zarr.open_array(str(reference / "labels" / "objects" / "0"), mode="r")[:]
    assert result["objects"] == len(np.unique(stored)) - 1 > 0
    assert (tmp_path / "ref.objects.csv").is_file()

    out, cancel = tmp_path / "out.zarr", threading.Event()
    request = Request(image=str(path), output=out, model=str(model), tile_size=32, extra={"batch_size": 1})
    gen = run_request(request, cancel)
    first = next(gen)
    cancel.set()
    with pytest.raises(ts.Cancelled):
        for _ in gen:
            pass
    assert first.total > 1
    # the next run of the same request continues it
    _run(request)
    np.testing.assert_array_equal(zarr.open_array(str(out / "0"), mode="r")[:],
                                  zarr.open_array(str(reference / "0"), mode="r")[:])


def test_run_errors_are_the_engines_one_line(tmp_path, model):
    with pytest.raises(ts.TileSegmentError, match="channel"):
        _run(Request(image=np.zeros((64, 64), np.uint8), axes="YX", output=tmp_path / "x.zarr", model=str(model)))


def test_levels_in_box_cuts_each_level_outward():
    levels = [np.zeros((100, 80)), np.zeros((50, 40)), np.zeros((25, 20))]
    cut = levels_in_box(levels, ((10, 31), (0, 80)))
    assert [c.shape for c in cut] == [(21, 80), (11, 40), (6, 20)]


def test_samples():
    from tilesegment.napari import blobs_volume, he_slide

    (rgb, kwargs, kind), = he_slide(size=256)
    assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8 and kwargs["rgb"] and kind == "image"
    (vol, kwargs, kind), = blobs_volume(shape=(8, 64, 64))
    assert vol.shape == (8, 64, 64) and vol.dtype == np.float32 and 0 <= vol.min() and vol.max() <= 1
    assert len(kwargs["scale"]) == 3


def test_manifest_is_valid_and_names_every_contribution():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("tilesegment")
    manifest.validate_imports()
    contributions = manifest.contributions
    assert {c.command for c in contributions.readers} == {"tilesegment.get_reader", "tilesegment.get_slide_reader"}
    assert {w.command for w in contributions.widgets} == {"tilesegment.segment", "tilesegment.colour_objects"}
    assert {s.key for s in contributions.sample_data} == {"he", "blobs"}


def test_colours_follow_the_measurement():
    import pandas as pd

    features = pd.DataFrame({"id": [1, 2, 3], "class": [2, 2, 2], "area": [10, 20, 5000],
                             "class_name": ["n"] * 3, "index": [1, 2, 3]})
    assert numeric_columns(features) == ["area"]
    colours = object_colours(features["id"].to_numpy(), features["area"].to_numpy())
    assert colours[1] != colours[2] != colours[3] and colours[0][3] == 0


@pytest.mark.skipif(not SHARED_SVS.exists(), reason="needs ../shared/data/small_HE.svs")
def test_slide_reader_opens_an_svs_lazily():
    import dask.array as da

    assert get_slide_reader(str(SHARED_SVS)) is not None and get_slide_reader("x.png") is None
    (data, kwargs, kind), = get_slide_reader(str(SHARED_SVS))(str(SHARED_SVS))
    levels = data if kwargs["multiscale"] else [data]
    assert kind == "image" and kwargs["rgb"] and all(isinstance(d, da.Array) for d in levels)
    assert kwargs["metadata"]["path"] == str(SHARED_SVS)
    region = levels[0][1000:1100, 2000:2100].compute()
    np.testing.assert_array_equal(region, ts.open_image(SHARED_SVS).read(1000, 1100, 2000, 2100))
