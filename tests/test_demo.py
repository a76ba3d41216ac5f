"""The bundled demo model and `tilesegment demo`."""

import numpy as np

import tilesegment as ts
from tilesegment.cli import main
from tilesegment.he import (BOUNDARY_WIDTH, boundary_ring, demo_scores, instance_scores, reference_masks,
                             synthetic_slide)
from tilesegment.models.load import DEMO_MODEL


def test_demo_model_is_small_bundled_and_documents_its_training():
    assert DEMO_MODEL.stat().st_size <= 5 * 1024 * 1024
    model = ts.load_model("demo")
    assert model.config == {"in_channels": 3, "num_classes": 4, "base_channels": 8, "depth": 4}
    assert model.metadata["classes"] == ["background", "tissue", "nuclei", "nucleus boundary"]
    assert model.metadata["instances"] == {"classes": [2], "grow_into": [3], "grow": BOUNDARY_WIDTH + 1}
    assert {"seed", "data", "validation", "steps"} <= set(model.metadata)


def test_demo_model_finds_synthetic_nuclei_it_never_saw():
    rgb, truth = synthetic_slide((512, 512), seed=4242)
    labels = ts.segment(rgb, "demo", tile_size=256, progress=False)
    for pred, true in ((labels == 0, truth == 0), (labels >= 2, truth == 2)):  # nuclei: interior and boundary
        assert 2 * (pred & true).sum() / (pred.sum() + true.sum()) >= 0.7


def _objects(labels, **recipe):
    return np.asarray(ts.label_objects(labels, progress=False, **recipe).labels)


def test_demo_model_separates_touching_nuclei_by_seeds_and_growth():
    rgb, _, instances = synthetic_slide((384, 384), seed=4343, crowding=0.3, instances=True)
    model = ts.load_model("demo")
    labels = ts.segment(rgb, model, tile_size=256, progress=False)
    grown = instance_scores(_objects(labels, **model.metadata["instances"]), instances)
    plain = instance_scores(_objects(np.where(labels == 3, 2, labels), classes=[2]), instances)
    assert grown["f1"] >= 0.75 and grown["pq"] >= plain["pq"] + 0.05, (grown, plain)


def test_crowded_synthetic_nuclei_touch_and_their_rings_keep_the_seeds_apart():
    rgb, labels, instances = synthetic_slide((256, 256), seed=8, crowding=0.5, boundary=True, instances=True)
    rgb3, labels3 = synthetic_slide((256, 256), seed=8, crowding=0.5)
    assert (rgb == rgb3).all() and (labels3 == np.where(labels == 3, 2, labels)).all()
    assert instances.dtype == np.uint32 and ((instances > 0) == (labels >= 2)).all()
    assert set(np.unique(instances)) == set(range(instances.max() + 1))
    assert ((labels == 3) == boundary_ring(instances)).all()
    seeds = np.where(labels == 2, instances, 0)
    for a, b in ((seeds[1:], seeds[:-1]), (seeds[:, 1:], seeds[:, :-1]), (seeds[1:, 1:], seeds[:-1, :-1])):
        assert not ((a != b) & (a > 0) & (b > 0)).any()  # interiors of different nuclei never touch
    plain = instance_scores(_objects(labels3, classes=[2]), instances)
    grown = instance_scores(_objects(labels, classes=[2], grow=BOUNDARY_WIDTH + 1, grow_into=[3]), instances)
    assert plain["count_error"] < -0.2 * plain["true_count"]  # many nuclei touch
    assert grown["f1"] >= 0.97 and grown["pq"] >= 0.95  # the recipe gives them back from true labels


def test_crowding_off_keeps_the_slide_and_instances_match_its_nuclei():
    rgb, labels, instances = synthetic_slide((200, 240), seed=3, instances=True)
    rgb2, labels2 = synthetic_slide((200, 240), seed=3)
    assert (rgb == rgb2).all() and (labels == labels2).all() and ((instances > 0) == (labels == 2)).all()


def test_instance_scores_count_matches_above_half_iou():
    truth = np.zeros((10, 10), np.uint32)
    truth[1:5, 1:5], truth[6:9, 6:9], truth[0, 9] = 1, 2, 3
    predicted = np.zeros((10, 10), np.int64)
    predicted[1:5, 1:4], predicted[6:9, 6:7], predicted[8, 0] = 7, 9, 11  # IoU 0.75, 1/3, 0
    scores = instance_scores(predicted, truth)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 2, 2)
    assert scores["f1"] == 0.3333 and scores["sq"] == 0.75 and scores["pq"] == 0.25  # 2TP / (2TP + FP + FN) = 1/3
    assert scores["count_error"] == 0 and instance_scores(truth, truth)["pq"] == 1.0


def test_demo_model_on_the_real_slide_matches_colour_deconvolution(shared_svs):
    labels = ts.segment(shared_svs, "demo", tile_size=512, progress=False)
    source = ts.open_image(shared_svs)
    rgb = source.read(0, source.shape[0], 0, source.shape[1])
    scores = demo_scores(rgb, labels)
    assert scores["nuclei_dice"] >= 0.6
    assert scores["blank_glass_as_background"] >= 0.9


def test_reference_glass_mask_matches_synthetic_glass_and_nuclei_are_haematoxylin_dark():
    rgb, truth = synthetic_slide((400, 400), seed=5)
    glass, nuclei = reference_masks(rgb)
    assert (glass == (truth == 0)).mean() >= 0.9
    assert not (nuclei & glass).any() and (truth[nuclei] != 0).all()


def test_demo_command_writes_zarr_objects_and_a_small_overview_and_says_how_to_open_it(tmp_path, capsys):
    import gzip
    import json

    import imagecodecs
    import pandas as pd
    import zarr

    assert main(["demo", str(tmp_path / "demo"), "--size", "640", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "napari" in out and "overview.jpg" in out and "objects.geojson.gz" in out
    labels = zarr.open_array(tmp_path / "demo" / "segmentation.zarr" / "0", mode="r")
    assert labels.shape == (640, 640) and set(np.unique(labels[:])) <= {0, 1, 2, 3}
    objects = zarr.open_array(tmp_path / "demo" / "segmentation.zarr" / "labels" / "objects" / "0", mode="r")[:]
    table = pd.read_csv(tmp_path / "demo" / "objects.csv")
    assert len(table) == objects.max() > 10 and set(table["class_name"]) == {"nuclei"}  # the model's recipe
    assert ((labels[:] == 2) <= (objects > 0)).all() and ((objects > 0) <= (labels[:] >= 2)).all()
    assert "F1" in out
    features = json.loads(gzip.open(tmp_path / "demo" / "objects.geojson.gz").read())["features"]
    kinds = {(f["properties"]["objectType"], f["properties"]["classification"]["name"]) for f in features}
    assert kinds == {("detection", "nuclei"), ("annotation", "tissue")}
    jpeg = (tmp_path / "demo" / "overview.jpg").read_bytes()
    assert imagecodecs.jpeg_decode(jpeg).shape == (640, 2 * 640 + 8, 3)
    assert len(jpeg) < 500_000
    assert main(["demo", str(tmp_path / "demo"), "--size", "640", "--quiet"]) == 2  # no silent overwrite


def test_overview_outlines_each_nucleus_in_yellow_and_leaves_the_slide_unpainted():
    from tilesegment.demo import CLASS_COLOURS, overview

    rgb = np.full((20, 20, 3), 120, np.uint8)
    labels = np.zeros((20, 20), np.uint8)
    labels[2:18, 2:18] = 1
    labels[5:9, 5:12] = 2  # two touching nuclei: one region, two objects
    objects = np.zeros((20, 20), np.uint32)
    objects[5:9, 5:8], objects[5:9, 8:12] = 1, 2
    drawn = overview(rgb, labels, objects)[:, 28:]
    yellow = (drawn == CLASS_COLOURS[2]).all(-1)
    assert yellow[6, 7] and yellow[6, 8]  # the border between the two objects is drawn
    assert (drawn[11:15, 11:15] == 120).all()  # inside tissue, no tint
    assert (drawn[2, 2:18] == CLASS_COLOURS[1]).all()  # tissue border against the glass


def test_segment_without_model_uses_the_demo_model_and_says_so(tmp_path, rgb_tiff, capsys):
    assert main(["segment", str(rgb_tiff), str(tmp_path / "o.zarr")]) == 0
    assert "bundled demo model" in capsys.readouterr().err
