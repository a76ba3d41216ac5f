"""Whole objects across chunks: equal to whole-image connected components, table, GeoJSON, CLI."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

import tilesegment as ts
from tilesegment.testing import assert_exact
from tilesegment.cli import main
from tilesegment.he import CLASSES
from tilesegment.io.sinks import ZarrSink

from conftest import small_unet


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two labelings of the same pixels group them the same way."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


@st.composite
def chunked_maps(draw, ndim):
    shape = tuple(draw(st.integers(1, 14 if ndim == 2 else 7)) for _ in range(ndim))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    density = draw(st.sampled_from([0.3, 0.6, 0.9]))
    classes = draw(st.integers(1, 3))
    labels = np.where(rng.random(shape) < density, rng.integers(1, classes + 1, shape), 0).astype(np.uint8)
    stored = tuple(draw(st.integers(1, max(1, n))) for n in shape)
    processed = tuple(draw(st.integers(1, max(1, n))) for n in shape)
    connectivity = draw(st.integers(1, ndim))
    return labels, stored, processed, connectivity


def _check_equals_whole_image(labels, stored, processed, connectivity):
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=labels.shape, chunks=stored, dtype=labels.dtype)
    array[...] = labels
    objs = ts.label_objects(array, chunks=processed, connectivity=connectivity, progress=False)
    got = np.asarray(objs.labels)
    element = ndimage.generate_binary_structure(labels.ndim, connectivity)
    n = 0
    for k in np.unique(labels[labels > 0]):
        ref, m = ndimage.label(labels == k, element)
        mask = labels == k
        assert _same_partition(got[mask], ref[mask]), f"class {k}"
        n += m
    assert (got[labels == 0] == 0).all()
    assert got.dtype == np.uint32 and len(objs) == n
    assert set(np.unique(got[got > 0])) == set(range(1, n + 1))
    # ids in raster order of each object's first pixel
    flat = got.ravel()
    firsts = np.unique(flat[flat > 0], return_index=True)[1]
    assert (np.diff(firsts) > 0).all()
    return objs, got


def _check_table_is_regionprops(objs, got):
    from skimage.measure import regionprops

    table = objs.table
    props = regionprops(got.astype(np.int64))
    assert list(table["id"]) == [p.label for p in props]
    axes = "zyx"[3 - got.ndim:]
    for p, row in zip(props, table.itertuples()):
        assert row.area == p.area
        assert np.allclose([getattr(row, f"centroid_{a}") for a in axes], p.centroid)
        assert [getattr(row, f"bbox_{a}0") for a in axes] + [getattr(row, f"bbox_{a}1") for a in axes] == list(p.bbox)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunked_maps(2))
def test_2d_objects_in_any_chunks_equal_whole_image_components_and_regionprops(case):
    objs, got = _check_equals_whole_image(*case)
    _check_table_is_regionprops(objs, got)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunked_maps(3))
def test_3d_objects_in_any_chunks_equal_whole_image_components_and_regionprops(case):
    objs, got = _check_equals_whole_image(*case)
    _check_table_is_regionprops(objs, got)


def test_dask_input_in_irregular_chunks_and_named_classes_only():
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (37, 41)).astype(np.uint8)
    objs = ts.label_objects(da.from_array(labels, chunks=((10, 5, 22), (7, 30, 4))), classes=[1, 3],
                            progress=False)
    for k in (1, 3):
        ref, _ = ndimage.label(labels == k)
        assert _same_partition(objs.labels[labels == k], ref[labels == k])
    assert (objs.labels[(labels == 0) | (labels == 2)] == 0).all()
    assert set(objs.table["class"]) == {1, 3}


def test_an_object_crossing_many_chunks_is_one_polygon_with_its_holes_and_exact_area(tmp_path):
    import shapely

    labels = np.zeros((60, 70), np.uint8)
    labels[5:55, 4:66] = 1
    labels[20:30, 20:30] = 0  # a hole across a chunk corner (chunks of 16)
    labels[40:42, 50:52] = 0
    labels[10:12, 10:12] = 2  # a second class inside the first: a hole of it, an object of its own
    objs = ts.label_objects(labels, chunks=16, progress=False)
    path = objs.to_geojson(tmp_path / "o.geojson")
    features = json.loads(path.read_text())["features"]
    assert len(features) == len(objs) == 2
    features.sort(key=lambda f: f["properties"]["measurements"]["Object ID"])
    big = shapely.geometry.shape(features[0]["geometry"])
    assert big.geom_type == "Polygon" and big.is_valid and len(big.interiors) == 3
    assert big.area == (labels == 1).sum() == objs.table.area[0]
    assert big.bounds == (4, 5, 66, 55)  # x0, y0, x1, y1 in full-resolution pixel coordinates
    assert features[1]["properties"]["classification"]["name"] == "class 2"


def test_geojson_is_what_qupath_reads_gzipped_with_types_classes_and_measurements(tmp_path):
    labels = np.zeros((40, 40), np.uint8)
    labels[2:8, 2:8] = 2
    labels[10:40, 0:40] = 1
    objs = ts.label_objects(labels, progress=False)
    path = objs.to_geojson(tmp_path / "o.geojson.gz", annotation_min_area=500)
    collection = json.loads(gzip.open(path).read())
    assert collection["type"] == "FeatureCollection"
    by_id = {f["properties"]["measurements"]["Object ID"]: f["properties"] for f in collection["features"]}
    assert by_id[1]["objectType"] == "detection" and by_id[2]["objectType"] == "annotation"
    assert by_id[1]["classification"]["name"] == "class 2" and len(by_id[1]["classification"]["color"]) == 3
    assert by_id[1]["measurements"]["area"] == 36
    with pytest.raises(ts.OutputExistsError):
        objs.to_geojson(path)
    scaled = objs.to_geojson(tmp_path / "t.geojson", annotation_classes=[2], annotation_min_area=None, scale=4)
    features = {f["properties"]["measurements"]["Object ID"]: f for f in json.loads(scaled.read_text())["features"]}
    assert features[1]["properties"]["objectType"] == "annotation"
    assert features[2]["properties"]["objectType"] == "detection"
    assert features[1]["geometry"]["coordinates"][0][0] in ([8, 8], [32, 8], [32, 32], [8, 32])


def test_connectivity_2_joins_diagonal_pixels_into_one_valid_multipolygon(tmp_path):
    import shapely

    labels = np.zeros((6, 6), np.uint8)
    labels[1, 1] = labels[2, 2] = labels[3, 3] = 1
    objs = ts.label_objects(labels, connectivity=2, chunks=2, progress=False)
    assert len(objs) == 1
    geometry = dict(objs.outlines())[1]
    assert geometry.is_valid and geometry.geom_type == "MultiPolygon" and geometry.area == 3
    assert shapely.get_num_geometries(geometry) == 3


def test_table_goes_to_csv_and_parquet_by_extension(tmp_path):
    pd = pytest.importorskip("pandas")
    labels = np.random.default_rng(0).integers(0, 3, (30, 30)).astype(np.uint8)
    objs = ts.label_objects(labels, progress=False)
    back = pd.read_csv(objs.to_table(tmp_path / "t.csv"))
    assert list(back.columns) == list(objs.table.columns)
    assert back["class_name"].tolist() == objs.table["class_name"].tolist()
    numbers = objs.table.drop(columns="class_name")
    np.testing.assert_allclose(back[numbers.columns].to_numpy(float), numbers.to_numpy(float))
    pytest.importorskip("pyarrow")
    back = pd.read_parquet(objs.to_table(tmp_path / "t.parquet"))
    assert back["area"].tolist() == objs.table["area"].tolist()
    with pytest.raises(ts.UsageError, match="csv"):
        objs.to_table(tmp_path / "t.xlsx")


def test_bad_inputs_fail_with_one_clear_error():
    with pytest.raises(ts.InputError, match="not a labels image"):
        ts.label_objects(np.random.rand(10, 10), progress=False)
    with pytest.raises(ts.InputError, match="not a labels image"):
        ts.label_objects(np.zeros((2, 3, 10, 10), np.uint8), progress=False)
    with pytest.raises(ts.UsageError, match="connectivity"):
        ts.label_objects(np.zeros((10, 10), np.uint8), connectivity=3, progress=False)
    with pytest.raises(ts.UsageError, match="out of range"):
        ts.label_objects(np.zeros((10, 10), np.uint8), classes=[-1], progress=False)
    with pytest.raises(ts.UsageError, match="2-D"):
        ts.label_objects(np.ones((3, 4, 4), np.uint8), progress=False).to_geojson("x.geojson")


@pytest.fixture
def segmented(tmp_path, rgb_tiff):
    """A labels OME-Zarr from segment (3 classes, 2 um/px) with the class names its model carries."""
    model = ts.save_model(small_unet(), tmp_path / "m.pt", classes=["background", "stroma", "cells"])
    out = tmp_path / "seg.zarr"
    ts.segment(rgb_tiff, model, out, tile_size=32, chunk_size=32, progress=False)
    return out


def test_segment_output_gets_an_ngff_label_image_with_names_and_pixel_size(segmented):
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    objs = ts.label_objects(segmented, progress=False)
    labels = zarr.open_array(segmented / "0", mode="r")[:]
    np.testing.assert_array_equal(objs.labels[:], zarr.open_array(segmented / "labels" / "objects" / "0")[:])
    assert ((objs.labels[:] > 0) == (labels > 0)).all()
    ImageLabel.from_zarr(zarr.open_group(segmented / "labels" / "objects", mode="r"))
    Image.from_zarr(zarr.open_group(segmented, mode="r"))
    assert zarr.open_group(segmented / "labels").attrs["ome"]["labels"] == ["objects"]
    assert set(objs.table["class_name"]) <= {"stroma", "cells"}
    np.testing.assert_allclose(objs.table["area_um2"], objs.table["area"] * 4.0)
    with pytest.raises(ts.OutputExistsError, match="overwrite"):
        ts.label_objects(segmented, progress=False)
    with pytest.raises(ts.UsageError, match="class 3 is out of range.*0 background, 1 stroma, 2 cells"):
        ts.label_objects(segmented, classes=[3], overwrite=True, progress=False)
    again = ts.label_objects(segmented, classes=[2], overwrite=True, progress=False)
    assert set(again.table["class"]) == {2}


def test_probabilities_output_gives_objects_of_its_argmax_with_mean_probability(tmp_path, rgb_tiff):
    out = tmp_path / "p.zarr"
    probs = ts.segment(rgb_tiff, small_unet(), out, tile_size=32, mode="probabilities", progress=False)[:]
    objs = ts.label_objects(out, output=tmp_path / "objects.zarr", progress=False)
    argmax, top = probs.argmax(0), probs.max(0) / 255.0
    for k in range(1, probs.shape[0]):
        ref, _ = ndimage.label(argmax == k)
        assert _same_partition(objs.labels[:][argmax == k], ref[argmax == k])
    ids = objs.labels[:]
    expected = ndimage.mean(top, ids, index=objs.table["id"])
    assert_exact(objs.table["mean_probability"].to_numpy(), expected)


def test_labels_with_separate_probabilities_measure_each_objects_class(tmp_path):
    rng = np.random.default_rng(2)
    probs = rng.integers(0, 256, (3, 20, 24)).astype(np.uint8)
    labels = probs.argmax(0).astype(np.uint8)
    objs = ts.label_objects(labels, probabilities=probs, progress=False)
    top = probs.max(0) / 255.0
    assert_exact(objs.table["mean_probability"].to_numpy(), ndimage.mean(top, objs.labels, index=objs.table["id"]))


def test_cli_objects_writes_labels_table_and_geojson_and_refuses_to_overwrite(segmented, tmp_path, capsys):
    table, geojson = tmp_path / "t.csv", tmp_path / "g.geojson.gz"
    argv = ["objects", str(segmented), "--classes", "2", "--table", str(table), "--geojson", str(geojson)]
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "objects" in err and "cells" in err and "QuPath" in err
    features = json.loads(gzip.open(geojson).read())["features"]
    assert len(features) == len(table.read_text().splitlines()) - 1 > 0
    assert main(argv) == 2 and "exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert main(["objects", str(segmented), "--classes", "5", "--overwrite"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["objects", str(segmented), "--connectivity", "3", "--overwrite"]) == 2
    probe = tmp_path / "rgb.zarr"
    ZarrSink(probe, (3, 8, 8), np.uint8, (3, 8, 8)).close()  # a (c, y, x) image, not labels
    assert main(["objects", str(probe)]) == 2 and "not a labels image" in capsys.readouterr().err


def test_segment_with_objects_writes_them_beside_the_output(tmp_path, rgb_tiff, model_file, capsys):
    out = tmp_path / "slide.zarr"
    argv = ["segment", str(rgb_tiff), str(out), "--model", str(model_file), "--tile-size", "32", "--objects", "-q"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "labels" / "objects" / "0").exists()
    assert (tmp_path / "slide.objects.csv").exists() and (tmp_path / "slide.geojson.gz").exists()
    assert main(argv) == 2  # the output exists: nothing overwritten


def test_real_slide_nuclei_equal_whole_image_components_and_outline_them(shared_svs, tmp_path):
    """Demo model at tile and chunk 256: nucleus-interior objects across chunks = whole-image components."""
    import shapely

    out = tmp_path / "he.zarr"
    labels = ts.segment(shared_svs, "demo", out, tile_size=256, chunk_size=256, progress=False)[:]
    objs = ts.label_objects(out, classes=[2], class_names=CLASSES, progress=False)
    ref, n = ndimage.label(labels == 2)
    got = objs.labels[:]
    assert len(objs) == n > 1000
    assert _same_partition(got[labels == 2], ref[labels == 2]) and (got[labels != 2] == 0).all()
    crossing = ((objs.table.bbox_y0 // 256) != ((objs.table.bbox_y1 - 1) // 256)).sum()
    assert crossing > 25  # many nuclei interiors (class 2 of the 4-class demo model) are cut by chunk borders and joined
    features = json.loads(gzip.open(objs.to_geojson(tmp_path / "nuclei.geojson.gz")).read())["features"]
    assert len(features) == n
    area = objs.table.set_index("id")["area"]
    for feature in features:
        polygon = shapely.geometry.shape(feature["geometry"])
        assert polygon.geom_type == "Polygon" and polygon.is_valid
        pixels = area[feature["properties"]["measurements"]["Object ID"]]
        assert abs(polygon.area - pixels) <= polygon.length / 2
        assert feature["properties"]["classification"]["name"] == "nuclei"
    # the model's recipe (seeds grown into the boundary): in 256-px chunks as on the whole map
    grown = ts.label_objects(out, tmp_path / "grown.zarr", progress=False)
    assert grown.recipe is not None and grown.recipe.grow > 0
    whole = ts.label_objects(labels, classes=grown.recipe.classes, grow=grown.recipe.grow,
                             grow_into=grown.recipe.grow_into, chunks=labels.shape, progress=False)
    np.testing.assert_array_equal(grown.labels[:], whole.labels)
    same = ["id", "class", "area", "centroid_y", "centroid_x", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"]
    assert grown.table[same].equals(whole.table[same]) and len(grown) == n  # the numpy map has no names


def test_merge_keeps_only_about_one_band_of_chunk_shells():
    from tilesegment._components import Grid, Merger, measure_chunk

    labels = np.random.default_rng(5).integers(0, 2, (1, 80, 120)).astype(np.uint8)
    grid = Grid.regular(labels.shape, (1, 10, 10))  # 8 x 12 chunks
    merger = Merger(grid, connectivity=2)
    most = 0
    for i in range(grid.n_chunks):
        result, _ = measure_chunk(i, grid, labels[grid.region(i)], None, [1], 2)
        merger.add(result)
        most = max(most, sum(r.shell is not None for r in merger.results.values()))
    assert most <= grid.counts[2] + 2
    assert all(r.shell is None for r in merger.results.values())


def test_ngff_04_output_gets_its_objects_in_ngff_04(tmp_path, rgb_tiff):
    from ome_zarr_models.v04.image_label import ImageLabel

    model = ts.save_model(small_unet(), tmp_path / "m.pt", classes=["background", "stroma", "cells"])
    out = tmp_path / "seg04.zarr"
    ts.segment(rgb_tiff, model, out, tile_size=32, chunk_size=32, ngff="0.4", progress=False)
    objs = ts.label_objects(out, progress=False)
    assert "area_um2" in objs.table.columns and set(objs.table["class_name"]) <= {"stroma", "cells"}
    labels = zarr.open_group(out / "labels", mode="r")
    assert labels.metadata.zarr_format == 2 and labels.attrs["labels"] == ["objects"]
    ImageLabel.from_zarr(zarr.open_group(out / "labels" / "objects", mode="r"))
    with pytest.raises(ts.UsageError, match="out of range"):
        ts.label_objects(out, classes=[3], overwrite=True, progress=False)


def test_a_failed_geojson_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import shapely

    labels = np.zeros((20, 20), np.uint8)
    labels[2:8, 2:8] = 1
    objs = ts.label_objects(labels, progress=False)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(shapely, "to_geojson", broken)
    with pytest.raises(OSError, match="disk full"):
        objs.to_geojson(tmp_path / "o.geojson")
    assert list(tmp_path.iterdir()) == []


def _tree(path):
    """Every file under `path` with its bytes: what a run must leave as it was."""
    from pathlib import Path

    return {p: p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


@pytest.mark.filterwarnings("ignore:Call to deprecated class Scaler:DeprecationWarning")
@pytest.mark.parametrize("kind", ["raw array", "ome-zarr from another tool"])
def test_objects_never_write_into_a_store_tilesegment_did_not_write(tmp_path, capsys, kind):
    volume = np.random.default_rng(3).integers(0, 4, (3, 40, 40), dtype=np.uint8)
    store = tmp_path / "input.zarr"
    if kind == "raw array":
        zarr.save_array(str(store), volume)
    else:  # an NGFF 0.5 image as ome-zarr-py (or any writer) makes it, no tilesegment record
        from ome_zarr.writer import write_image

        write_image(volume, zarr.open_group(str(store), mode="w"), axes="zyx", scale_factors=(2,))
    before = _tree(store)
    code = main(["objects", str(store), "--classes", "1"])
    err = capsys.readouterr().err
    assert _tree(store) == before  # not one byte added or changed
    if kind == "raw array":
        assert code == 0 and "pass --output" in err  # counted in memory, stored nowhere
    else:
        assert code == 2 and "was not written by tilesegment" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "objects.zarr"
    assert main(["objects", str(store), "--classes", "1", "--output", str(out), "--quiet"]) == 0
    assert _tree(store) == before
    labels = zarr.open_array(out / "0")[:]
    expected, _ = ndimage.label(volume == 1)
    assert labels.max() == expected.max()


def test_objects_refuse_a_read_only_store_of_ours_and_write_elsewhere(segmented, tmp_path):
    from zarr.storage import LocalStore

    group = zarr.open_group(LocalStore(segmented, read_only=True), mode="r")
    before = _tree(segmented)
    with pytest.raises(ts.UsageError, match="read-only; pass output="):
        ts.label_objects(group, progress=False)
    objs = ts.label_objects(group, tmp_path / "elsewhere.zarr", progress=False)
    assert len(objs) > 0 and _tree(segmented) == before


def test_objects_report_progress_and_a_cancel_writes_nothing(segmented, tmp_path):
    import threading

    seen, cancel = [], threading.Event()
    before = _tree(segmented)

    def progress(done, total):
        seen.append((done, total))
        if done >= 3:
            cancel.set()

    with pytest.raises(ts.Cancelled, match="objects pass cancelled .*no objects were written"):
        ts.label_objects(segmented, chunks=32, progress=progress, cancel=cancel)
    assert _tree(segmented) == before and not (segmented / "labels").exists()
    total = seen[0][1]
    assert seen[0] == (0, total) and seen[-1][0] == 3 < total  # stopped at once, between chunks
    seen.clear()
    objs = ts.label_objects(segmented, chunks=32, progress=lambda done, total: seen.append((done, total)))
    assert len(objs) > 0 and seen[-1] == (total, total)  # labelled, then written: 2 steps per chunk


def test_a_mode_registered_elsewhere_is_read_without_an_edit_in_objects(tmp_path):
    """A per-class mode another package registers: its maps are read as their argmax."""
    from tilesegment.modes import Mode
    from tilesegment.registry import modes

    class Scores(Mode):
        def __init__(self):
            super().__init__("test-scores", np.dtype(np.float32), per_class=True, compression=1.0)

    scores = np.random.default_rng(6).normal(size=(3, 20, 24)).astype(np.float32)
    group = zarr.open_group(tmp_path / "s.zarr", mode="w")
    group.create_array("0", data=scores, chunks=(3, 8, 8))
    axes = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space"} for a in "yx"]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]}
    group.attrs["tilesegment"] = {"mode": "test-scores", "complete": True}
    with pytest.raises(ts.InputError, match="'test-scores', which no installed package provides"):
        ts.label_objects(tmp_path / "s.zarr", tmp_path / "o.zarr", progress=False)
    modes.register("test-scores", Scores())
    try:
        objs = ts.label_objects(tmp_path / "s.zarr", tmp_path / "o.zarr", progress=False)
    finally:
        modes.unregister("test-scores")
    argmax = scores.argmax(0)
    for k in (1, 2):
        ref, _ = ndimage.label(argmax == k)
        assert _same_partition(objs.labels[:][argmax == k], ref[argmax == k])
    softmax = 1.0 / np.exp(scores - scores.max(0)).sum(0)  # the top class's probability, as for logits
    assert_exact(objs.table["mean_probability"].to_numpy(),
                 ndimage.mean(softmax, objs.labels[:], index=objs.table["id"]))


@pytest.mark.parametrize("grow", [0, 2])
def test_the_objects_pyramid_keeps_ids_at_every_level_inside_and_outside_a_segment_output(tmp_path, grow):
    # Ids are no quantities: a level holds the first id of each group, never a mean of ids.
    rng = np.random.default_rng(7)
    labels = np.where(rng.random((2100, 2300)) < 0.5, 2, 3).astype(np.uint8)
    kwargs = {"grow": grow, "grow_into": [3]} if grow else {}
    objs = ts.label_objects(labels, tmp_path / "o.zarr", classes=[2], chunks=512, progress=False, **kwargs)
    group = zarr.open_group(tmp_path / "o.zarr", mode="r")
    full = group["0"][:]
    np.testing.assert_array_equal(full, objs.labels[:])
    assert group["1"].chunks == (256, 256)  # filled as level 0 was written, one chunk per chunk
    np.testing.assert_array_equal(group["1"][:], full[::2, ::2])
    np.testing.assert_array_equal(group["2"][:], full[::4, ::4])


@pytest.mark.parametrize("keep", [0, 3000, 1 << 30])
def test_objects_are_the_same_whether_chunk_maps_are_kept_some_or_labelled_again(monkeypatch, keep):
    from tilesegment.objects import passes

    monkeypatch.setattr(passes, "KEEP_BYTES", keep)  # none kept, a few, all
    rng = np.random.default_rng(11)
    labels = np.where(rng.random((90, 70)) < 0.6, rng.integers(1, 3, (90, 70)), 0).astype(np.uint8)
    _check_equals_whole_image(labels, (16, 16), (16, 16), 1)
    grown = ts.label_objects(labels, classes=[1], grow=2, grow_into=[2], chunks=16, progress=False)
    again = ts.label_objects(labels, classes=[1], grow=2, grow_into=[2], chunks=90, progress=False)
    np.testing.assert_array_equal(grown.labels, again.labels)
