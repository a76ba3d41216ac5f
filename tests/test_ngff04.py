"""NGFF 0.4 output (zarr v2) for QuPath and older readers; 0.5 stays the default."""

import json

import numpy as np
import pytest
import zarr

import tilesegment as ts
from tilesegment.cli import main
from tilesegment.io.manifest import Manifest

from conftest import small_unet

NET3 = small_unet(3, 3)


def _image(shape, seed=4):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_ngff_04_labels_validate_with_pyramid_scale_and_window(tmp_path):
    from ome_zarr_models.v04.image import Image

    image = _image((1100, 300))
    out = tmp_path / "labels.zarr"
    result = ts.segment(image, NET3, out, tile_size=256, ngff="0.4", progress=False)
    np.testing.assert_array_equal(result[:], ts.segment(image, NET3, tile_size=256, progress=False))
    assert (out / ".zgroup").is_file() and not (out / "zarr.json").exists()  # zarr v2
    zarray = json.loads((out / "0" / ".zarray").read_text())
    assert zarray["dimension_separator"] == "/" and zarray["compressor"]["cname"] == "zstd"
    group = zarr.open_group(out, mode="r")
    assert group.metadata.zarr_format == 2 and "ome" not in group.attrs
    image = Image.from_zarr(group)
    assert image.attributes.omero.channels[0].window.end == 2 and "image-label" not in group.attrs
    ms = group.attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["y", "x"]
    shapes = [group[d["path"]].shape for d in ms["datasets"]]
    assert shapes == [(1100, 300), (550, 150)]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[1.0, 1.0], [2.0, 2.0]]
    np.testing.assert_array_equal(group["1"][:], group["0"][::2, ::2])
    assert group.attrs["tilesegment"]["complete"] is True


def test_ngff_04_probabilities_validate_with_channel_axis_and_pixel_size(tmp_path, rgb_tiff):
    from ome_zarr_models.v04.image import Image

    out = tmp_path / "p.zarr"
    ts.segment(rgb_tiff, NET3, out, tile_size=64, mode="probabilities", ngff="0.4", progress=False)
    group = zarr.open_group(out, mode="r")
    Image.from_zarr(group)
    ms = group.attrs["multiscales"][0]
    assert [(a["name"], a["type"]) for a in ms["axes"]] == [("c", "channel"), ("y", "space"), ("x", "space")]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 2.0, 2.0]  # 2 um/px
    assert "image-label" not in group.attrs


def test_ngff_04_output_opens_as_multiscale_with_the_ome_zarr_reader(tmp_path):
    reader = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    image = _image((1100, 200), seed=6)
    out = tmp_path / "qupath.zarr"
    ts.segment(image, NET3, out, tile_size=256, ngff="0.4", progress=False)
    location = parse_url(str(out))
    assert location.version == "0.4"
    nodes = list(reader.Reader(location)())
    assert reader.Multiscales.matches(nodes[0].zarr)
    assert [tuple(d.shape) for d in nodes[0].data] == [(1100, 200), (550, 100)]
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), zarr.open_array(out / "0")[:])


def test_default_output_stays_ngff_05_zarr_v3(tmp_path):
    out = tmp_path / "v5.zarr"
    ts.segment(_image((100, 90)), NET3, out, tile_size=32, progress=False)
    group = zarr.open_group(out, mode="r")
    assert group.metadata.zarr_format == 3 and group.attrs["ome"]["version"] == "0.5"


def test_unknown_ngff_version_is_refused_before_any_work(tmp_path):
    with pytest.raises(ts.UsageError, match="ngff '0.3' is not supported; use one of 0.5, 0.4"):
        ts.prepare(_image((64, 64)), NET3, tmp_path / "o.zarr", ngff="0.3")
    assert not (tmp_path / "o.zarr").exists()


def test_interrupted_ngff_04_run_resumes_to_the_identical_output(tmp_path, monkeypatch):
    image = _image((640, 640), seed=2)  # 100 blocks of one 64-px tile
    reference = ts.segment(image, NET3, tile_size=64, progress=False)
    out = tmp_path / "o.zarr"
    calls = {"n": 0}
    original_add = ts.Stitcher.add

    def interrupting_add(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 40:
            raise KeyboardInterrupt
        return original_add(self, *args, **kwargs)

    monkeypatch.setattr(ts.Stitcher, "add", interrupting_add)
    with pytest.raises(KeyboardInterrupt):
        ts.segment(image, NET3, out, tile_size=64, chunk_size=64, ngff="0.4", progress=False)
    monkeypatch.undo()
    done = len(Manifest(out).done_blocks())
    assert 0 < done < 100 and "multiscales" not in zarr.open_group(out, mode="r").attrs
    with pytest.raises(ts.UsageError, match="cannot resume .*ngff was '0.4', now None"):
        ts.prepare(image, NET3, out, tile_size=64, chunk_size=64, resume=True)  # default 0.5
    job = ts.prepare(image, NET3, out, tile_size=64, chunk_size=64, ngff="0.4", resume=True)
    assert len(job.done_blocks) == done
    result, _ = job.run(progress=False)
    np.testing.assert_array_equal(result[:], reference)
    group = zarr.open_group(out, mode="r")
    assert group.metadata.zarr_format == 2 and group.attrs["multiscales"][0]["version"] == "0.4"
    assert not (out / ".tilesegment").exists()


def test_cli_ngff_04_writes_zarr_v2_and_overwrite_keeps_the_version(tmp_path, rgb_tiff, model_file):
    out = tmp_path / "cli.zarr"
    args = ["segment", str(rgb_tiff), str(out), "--model", str(model_file), "--tile-size", "64", "--quiet"]
    assert main([*args, "--ngff", "0.4"]) == 0
    assert zarr.open_group(out, mode="r").metadata.zarr_format == 2
    assert main([*args, "--ngff", "0.4"]) == 2  # exists, no --overwrite
    assert main([*args, "--overwrite"]) == 0  # replaced by a 0.5 output
    group = zarr.open_group(out, mode="r")
    assert group.metadata.zarr_format == 3 and not (out / ".zgroup").exists()
    with pytest.raises(SystemExit, match="2"):
        main([*args, "--ngff", "0.3"])
