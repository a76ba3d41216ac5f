"""Seeds grown into whole objects: chunked equals the whole-image definition, bit for bit, row for row."""

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
from tilesegment.errors import UsageError
from tilesegment.objects import Grow


def _reference(labels, seeds, into, k, spacing, connectivity=1):
    """The definition on the whole array, written apart from the engine: components of the seed
    classes numbered by first pixel in raster order; every pixel of `into` outside them takes the
    id of the nearest object within k (Euclidean, with `spacing`), the smaller id on a tie."""
    element = ndimage.generate_binary_structure(labels.ndim, connectivity)
    ids = np.zeros(labels.shape, np.int64)
    n = 0
    for c in seeds:
        lab, m = ndimage.label(labels == c, element)
        ids[lab > 0] = lab[lab > 0] + n
        n += m
    uniq, first = np.unique(ids.ravel(), return_index=True)
    order = uniq[uniq > 0][np.argsort(first[uniq > 0])]
    renumber = np.zeros(n + 1, np.int64)
    renumber[order] = np.arange(1, len(order) + 1)
    ids = renumber[ids]
    out = ids.copy()
    target = (ids == 0) & np.isin(labels, into)
    best = np.full(labels.shape, np.inf)
    if k > 0:
        for i in range(1, int(ids.max()) + 1):
            d = ndimage.distance_transform_edt(ids != i, sampling=spacing)
            better = target & (d <= k) & (d < best)  # strictly nearer: the smaller id keeps a tie
            out[better] = i
            best[better] = d[better]
    return out


def _reference_table(labels, ids, seed_classes_of):
    """Row per object: area, centroid, box, pixels per class (from the final ids, by numpy)."""
    from skimage.measure import regionprops

    rows = []
    for p in regionprops(ids):
        votes = np.bincount(labels[ids == p.label], minlength=4)
        rows.append((p.label, seed_classes_of[p.label], p.area, *np.round(p.centroid, 9), *p.bbox, *votes))
    return rows


def _table_rows(objs, ndim):
    t = objs.table
    axes = "zyx"[3 - ndim:]
    cols = ["id", "class", "area"] + [f"centroid_{a}" for a in axes] + [f"bbox_{a}0" for a in axes] \
        + [f"bbox_{a}1" for a in axes]
    rows = []
    for r in t.to_dict("records"):
        votes = [r.get(f"pixels_class_{c}", 0) for c in range(4)]
        rows.append(tuple(round(float(r[c]), 9) if c.startswith("centroid") else int(r[c]) for c in cols)
                    + tuple(votes))
    return rows


@st.composite
def grow_cases(draw, ndim):
    big = 28 if ndim == 2 else 9
    shape = tuple(draw(st.integers(1, big)) for _ in range(ndim))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # classes 0 background, 1 tissue, 2 seed, 3 boundary; sparse seeds give long growths and ties
    p = draw(st.sampled_from([(0.3, 0.2, 0.05, 0.45), (0.1, 0.1, 0.3, 0.5), (0.0, 0.0, 0.6, 0.4)]))
    labels = rng.choice(4, size=shape, p=p).astype(np.uint8)
    chunks = tuple(draw(st.integers(min(2, n), n)) for n in shape)  # rarely dividing the map
    k = draw(st.sampled_from([0, 1, 1.5, 2, 3, 4.5, 7, 12]))
    into = draw(st.sampled_from([(3,), (1, 3)]))
    spacing = None if ndim == 2 else draw(st.sampled_from([None, (2.0, 1.0, 1.0), (1.0, 0.5, 1.5)]))
    return labels, chunks, k, into, spacing


def _check(case, stored):
    labels, chunks, k, into, spacing = case
    source = labels
    if stored:  # a zarr map in its own chunks, processed in others
        source = zarr.create_array(zarr.storage.MemoryStore(), shape=labels.shape,
                                   chunks=tuple(max(1, c // 2) for c in chunks), dtype=labels.dtype)
        source[...] = labels
    kwargs = {"grow": k, "grow_into": into} if k else {}
    objs = ts.label_objects(source, classes=[2], chunks=chunks, spacing=spacing, progress=False, **kwargs)
    sampling = None if spacing is None else np.asarray(spacing) / min(spacing)
    want = _reference(labels, [2], into, k, sampling)
    got = np.asarray(objs.labels)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.uint32
    if k:
        assert objs.steps == (f"grow{k:g}",)
        seed_class = {i: 2 for i in range(1, int(want.max()) + 1)}
        assert _table_rows(objs, labels.ndim) == _reference_table(labels, want, seed_class)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grow_cases(2), st.booleans())
def test_2d_growth_in_any_chunks_equals_the_whole_image_definition(case, stored):
    _check(case, stored)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grow_cases(3), st.booleans())
def test_3d_growth_with_voxel_sizes_in_any_chunks_equals_the_whole_image_definition(case, stored):
    _check(case, stored)


@pytest.mark.parametrize("chunk", [2, 3, 4, 5, 16])
def test_equidistant_ties_on_chunk_faces_and_corners_go_to_the_smaller_id(chunk):
    # Single-pixel seeds 4 apart: the pixels half-way lie on the faces and corners of 4-px chunks,
    # each as near to two (on a face) or four (at a corner) seeds.
    labels = np.full((17, 17), 3, np.uint8)
    labels[2::4, 2::4] = 2
    objs = ts.label_objects(labels, classes=[2], grow=2 * np.sqrt(2), grow_into=[3], chunks=chunk, progress=False)
    want = _reference(labels, [2], [3], 2 * np.sqrt(2), None)
    np.testing.assert_array_equal(objs.labels, want)
    ids = objs.labels
    assert ids[4, 4] == ids[2, 2] and ids[4, 4] < ids[6, 6]  # a corner: four seeds at sqrt(8), the smallest
    assert ids[2, 4] == ids[2, 2] != ids[2, 6]  # a face: two seeds at 2, the smaller
    assert ids[16, 16] == ids[14, 14] != 0  # sqrt(8) is within the distance


def test_an_object_larger_than_a_chunk_grows_as_one_and_the_geojson_outlines_the_grown_objects(tmp_path):
    labels = np.full((40, 50), 1, np.uint8)
    yy, xx = np.mgrid[:40, :50]
    labels[(yy - 20) ** 2 + (xx - 15) ** 2 <= 14**2] = 3  # a large nucleus, its interior a seed
    labels[(yy - 20) ** 2 + (xx - 15) ** 2 <= 11**2] = 2
    labels[(yy - 20) ** 2 + (xx - 37) ** 2 <= 8**2] = 3  # a small one touching it
    labels[(yy - 20) ** 2 + (xx - 37) ** 2 <= 5**2] = 2
    objs = ts.label_objects(labels, classes=[2], grow=4, grow_into=[3], chunks=7, progress=False)
    np.testing.assert_array_equal(objs.labels, _reference(labels, [2], [3], 4, None))
    assert len(objs) == 2 and set(np.unique(objs.labels)) == {0, 1, 2}
    assert ((objs.labels > 0) == (labels >= 2)).all()  # the rings are within 4 px of their seeds
    path = objs.to_geojson(tmp_path / "o.geojson.gz")
    features = json.loads(gzip.decompress(path.read_bytes()))["features"]
    import shapely.geometry

    areas = {f["properties"]["measurements"]["Object ID"]: shapely.geometry.shape(f["geometry"]).area
             for f in features}
    assert areas == {i: float((objs.labels == i).sum()) for i in (1, 2)}
    row = objs.table.set_index("id").loc[1]
    assert row["pixels_class_2"] == (labels == 2)[objs.labels == 1].sum() > 0
    assert row["pixels_class_3"] + row["pixels_class_2"] == row["area"]


def test_growth_into_a_segment_output_is_written_as_its_objects_and_measured_again(tmp_path):
    labels = np.full((64, 64), 3, np.uint8)
    labels[::8, ::8] = 2
    store = zarr.create_array(tmp_path / "map.zarr", shape=labels.shape, chunks=(16, 16), dtype=np.uint8)
    store[...] = labels
    objs = ts.label_objects(store, tmp_path / "objects.zarr", classes=[2], grow=4, grow_into=[3],
                            progress=False)
    written = zarr.open_group(tmp_path / "objects.zarr", mode="r")["0"][:]
    np.testing.assert_array_equal(written, _reference(labels, [2], [3], 4, None))
    assert objs.table["area"].sum() == (written > 0).sum()
    assert "numbered" not in zarr.open_group(tmp_path / "objects.zarr", mode="r")  # scratch removed


def test_grow_step_is_a_chunk_step_with_its_halo():
    step = Grow(2.5)
    assert step.halo == 3 and step.name == "grow2.5" and step.mark == 2**32 - 1
    with pytest.raises(UsageError, match="positive"):
        Grow(0)


@pytest.mark.parametrize("kwargs, match", [
    ({"grow": 3}, "needs grow_into"),
    ({"grow_into": [3]}, "also pass grow"),
    ({"grow": -1, "grow_into": [3]}, ">= 0"),
    ({"grow": "3", "grow_into": [3]}, ">= 0"),
    ({"grow": 2, "grow_into": [3], "spacing": (1.0,)}, "one per axis"),
])
def test_bad_growth_arguments_fail_with_one_clear_error(kwargs, match):
    with pytest.raises(UsageError, match=match):
        ts.label_objects(np.zeros((8, 8), np.uint8), classes=[2], progress=False, **kwargs)


RECIPE = {"classes": [2], "grow_into": [3], "grow": 3}


def test_segment_objects_follow_the_models_recipe_identically_at_three_tile_sizes(tmp_path, rgb_tiff, capsys):
    import pandas as pd

    from conftest import small_unet
    from tilesegment.cli import main

    model = ts.save_model(small_unet(num_classes=4, seed=3), tmp_path / "m.pt", instances=RECIPE,
                          classes=["background", "tissue", "nucleus", "boundary"])
    got = []
    for tile in (32, 48, 64):
        out = tmp_path / f"t{tile}.zarr"
        assert main(["segment", str(rgb_tiff), str(out), "--model", str(model), "--tile-size", str(tile),
                     "--objects"]) == 0
        assert "recipe   seeds class 2, grown by up to 3 px into class 3" in capsys.readouterr().err
        group = zarr.open_group(out, mode="r")
        assert group.attrs["tilesegment"]["instances"] == RECIPE
        labels, objects = group["0"][:], group["labels/objects/0"][:]
        np.testing.assert_array_equal(objects, _reference(labels, [2], [3], 3, None))
        got.append((objects, pd.read_csv(tmp_path / f"t{tile}.objects.csv"),
                    gzip.decompress((tmp_path / f"t{tile}.geojson.gz").read_bytes())))
    assert got[0][0].max() > 5 and "pixels_boundary" in got[0][1].columns
    for objects, table, geojson in got[1:]:
        np.testing.assert_array_equal(objects, got[0][0])
        pd.testing.assert_frame_equal(table, got[0][1])
        assert geojson == got[0][2]


def test_a_model_without_a_recipe_is_given_one_on_the_command_line(tmp_path, rgb_tiff, capsys):
    from conftest import small_unet
    from tilesegment.cli import main

    model = ts.save_model(small_unet(num_classes=4), tmp_path / "m.pt")
    out = tmp_path / "o.zarr"
    assert main(["segment", str(rgb_tiff), str(out), "--model", str(model), "--classes", "2", "--grow", "2",
                 "--grow-into", "3", "-q"]) == 0
    assert zarr.open_group(out, mode="r").attrs["tilesegment"]["instances"] == {
        "classes": [2], "grow_into": [3], "grow": 2.0}
    objs = ts.label_objects(out, progress=False)  # the recorded recipe, with no arguments
    assert objs.recipe.grow == 2 and objs.steps == ("grow2",)
    assert ts.label_objects(out, tmp_path / "plain.zarr", classes=[2], progress=False).recipe is None
    assert main(["objects", str(out), "--classes", "2", "--grow", "1.5", "--grow-into", "1,3",
                 "--output", str(tmp_path / "cli.zarr"), "-q"]) == 0
    labels = zarr.open_array(out / "0", mode="r")[:]
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "cli.zarr" / "0", mode="r")[:],
                                  _reference(labels, [2], [1, 3], 1.5, None))
    assert main(["segment", str(rgb_tiff), str(tmp_path / "x.zarr"), "--model", str(model), "--grow", "2"]) == 2
    assert "--grow and --grow-into need --classes" in capsys.readouterr().err
    assert main(["segment", str(rgb_tiff), str(tmp_path / "x.zarr"), "--model", str(model), "--classes", "7"]) == 2
    assert "class 7 is out of range" in capsys.readouterr().err


@pytest.mark.parametrize("recipe, match", [
    ({"grow": 2, "grow_into": [3]}, "no seed classes"),
    ({"classes": [2], "grow": 2}, "go together"),
    ({"classes": "2"}, "list of class numbers"),
    ({"classes": [2], "seeds": [1]}, "unknown keys"),
])
def test_a_bad_recipe_in_a_checkpoint_is_refused_with_one_line(tmp_path, rgb_tiff, recipe, match):
    from conftest import small_unet

    model = ts.save_model(small_unet(num_classes=4), tmp_path / "m.pt", instances=recipe)
    with pytest.raises(UsageError, match=match):
        ts.prepare(rgb_tiff, model, tmp_path / "o.zarr")


def test_growth_on_a_dask_cluster_equals_a_local_run(tmp_path):
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(3)
    labels = rng.choice(4, size=(70, 90), p=(0.2, 0.1, 0.2, 0.5)).astype(np.uint8)
    source = tmp_path / "map.zarr"
    zarr.create_array(source, data=labels, chunks=(16, 16))
    local = ts.label_objects(labels, classes=[2], grow=3, grow_into=[3], chunks=16, progress=False)
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=":0",
                            silence_logs=40) as client:
        remote = ts.label_objects(source, tmp_path / "o.zarr", classes=[2], grow=3, grow_into=[3], client=client,
                                  progress=False)
    np.testing.assert_array_equal(remote.labels[:], local.labels)
    assert remote.table.equals(local.table)
