"""The bundled demo model and `tilesegment demo`."""

import numpy as np

import tilesegment as ts
from tilesegment.cli import main
from tilesegment.he import demo_scores, reference_masks, synthetic_slide
from tilesegment.models.load import DEMO_MODEL


def test_demo_model_is_small_bundled_and_documents_its_training():
    assert DEMO_MODEL.stat().st_size <= 5 * 1024 * 1024
    model = ts.load_model("demo")
    assert model.config == {"in_channels": 3, "num_classes": 3, "base_channels": 8, "depth": 4}
    assert model.metadata["classes"] == ["background", "tissue", "nuclei"]
    assert {"seed", "data", "validation", "steps"} <= set(model.metadata)


def test_demo_model_finds_synthetic_nuclei_it_never_saw():
    rgb, truth = synthetic_slide((512, 512), seed=4242)
    labels = ts.segment(rgb, "demo", tile_size=256, progress=False)
    for k in (0, 2):
        pred, true = labels == k, truth == k
        assert 2 * (pred & true).sum() / (pred.sum() + true.sum()) >= 0.7


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
    import imagecodecs
    import pandas as pd
    import zarr

    assert main(["demo", str(tmp_path / "demo"), "--size", "640", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "napari" in out and "overview.jpg" in out and "objects.geojson.gz" in out
    labels = zarr.open_array(tmp_path / "demo" / "segmentation.zarr" / "0", mode="r")
    assert labels.shape == (640, 640) and set(np.unique(labels[:])) <= {0, 1, 2}
    objects = zarr.open_array(tmp_path / "demo" / "segmentation.zarr" / "labels" / "objects" / "0", mode="r")[:]
    table = pd.read_csv(tmp_path / "demo" / "objects.csv")
    assert len(table) == objects.max() > 10 and set(table["class_name"]) == {"tissue", "nuclei"}
    assert ((objects > 0) == (labels[:] > 0)).all()
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
