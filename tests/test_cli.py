import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

import tilesegment as ts
from tilesegment.cli import main
from tilesegment.testing import assert_labels_match, whole_image_logits


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_segment_writes_ome_zarr_and_reports_geometry_and_throughput(capsys, rgb_tiff, model_file, tmp_path):
    out = tmp_path / "out.zarr"
    code, _, err = _run(capsys, "segment", rgb_tiff, out, "--model", model_file, "--tile-size", 32)
    assert code == 0, err
    assert "halo 20, step 4" in err and "network input 72x72" in err
    assert "tiles" in err and "Mpx/s" in err
    assert zarr.open_array(out / "0", mode="r").shape == (150, 131)


def test_info_lists_shape_pixel_size_and_valid_tiles(capsys, rgb_tiff, model_file):
    code, out, _ = _run(capsys, "info", rgb_tiff, "--model", model_file)
    assert code == 0
    assert "150 x 131" in out and "pixel size 2 x 2 um" in out and "halo 20, step 4" in out


@pytest.mark.parametrize(
    "args,match,exit_code",
    [
        (["segment", "{missing}", "{out}", "--model", "{model}"], "does not exist", 2),
        (["segment", "{text}", "{out}", "--model", "{model}"], "not a readable TIFF", 2),
        (["segment", "{tiff}", "{out}", "--model", "{model}", "--tile-size", "30"], "tile_size 30 is not a multiple of the network step 4; nearest valid: 28 or 32", 2),
        (["segment", "{gray}", "{out}", "--model", "{model}"], "expects 3 input channel", 2),
        (["segment", "{tiff}", "{out}", "--model", "{model}", "--channels", "0"], "pass --channels to pick", 2),
        (["segment", "{tiff}", "{existing}", "--model", "{model}"], "exists; pass --overwrite to replace", 2),
        (["segment", "{folder}", "{out}", "--model", "{model}"], "is a folder, not an image; to segment the 2 .tif "
         "file(s) in it, pass the quoted glob", 2),
        (["segment", "{tiff}", "{out}", "--model", "{missing}"], "not found", 2),
        (["segment", "{tiff}", "{out}", "--model", "{model}", "--device", "tpu"], "device 'tpu'", 2),
        (["segment", "{truncated}", "{out}", "--model", "{model}"], "truncated or corrupt", 2),
        (["segment", "{tiff}", "{out}", "--model", "{model}", "--level", "2"], "level 2 is out of range", 2),
        (["segment", "{tiff}", "{out}", "--model", "{model}", "--axes", "QYX"], "non-spatial axes [('Q', 150)]", 2),
        (["segment", "{tiff}", "{out}", "--model", "{model}", "--batch-size", "0"], "batch_size 0 must be at least 1", 2),
        (["segment", "{tiff}", "{out}", "--model", "{model}", "--mpp", "0.5"], "mpp 0.5 is finer than image.tif's 2 um/px", 2),
        (["segment", "{tiff}", "{out}", "--model", "{model}", "--resume", "--overwrite"], "exclude each other", 2),
    ],
)
def test_bad_input_gets_one_line_and_nonzero_exit_and_changes_nothing(
    capsys, tmp_path, rgb_tiff, model_file, args, match, exit_code
):
    import tifffile

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, np.zeros((40, 40), np.uint8))
    truncated = tmp_path / "truncated.tif"
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    tifffile.imwrite(truncated, noise, tile=(64, 64), photometric="rgb", compression="zlib")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    existing = tmp_path / "existing.zarr"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a.tif", "b.tif"):
        (folder / name).write_bytes(gray.read_bytes())
    names = dict(missing=tmp_path / "missing.tif", text=text, gray=gray, tiff=rgb_tiff, truncated=truncated,
                 model=model_file, out=tmp_path / "out.zarr", existing=existing, folder=folder)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run(capsys, *[a.format(**names) for a in args])
    assert code == exit_code
    assert match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not re.search(r"\b(overwrite|resume|axes|channels|output)=", err)  # the flags, not Python's words
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (existing / "keep.txt").read_text() == "precious"


def test_debug_flag_shows_the_traceback(tmp_path, model_file):
    with pytest.raises(ts.InputError):
        main(["--debug", "segment", str(tmp_path / "nope.tif"), str(tmp_path / "o.zarr"), "--model", str(model_file)])


def test_real_svs_through_cli_agrees_with_whole_image_inference(capsys, shared_svs, tmp_path):
    torch.manual_seed(0)
    net = ts.UNet(3, 3, base_channels=4, depth=4)
    model = ts.save_model(net, tmp_path / "net.pt")
    out = tmp_path / "he.zarr"
    code, _, err = _run(capsys, "segment", shared_svs, out, "--model", model, "--tile-size", 512, "--quiet")
    assert code == 0, err
    labels = zarr.open_array(out / "0", mode="r")[:]
    assert labels.shape == (2967, 2220)
    assert_labels_match(labels, whole_image_logits(shared_svs, net))


def test_bench_sweeps_tiles_and_batches_and_writes_csv_json_png(capsys, tmp_path):
    import csv

    out = tmp_path / "bench"
    code, stdout, err = _run(capsys, "bench", "--tile-sizes", "64,128", "--batch-sizes", "1,2",
                             "--device", "cpu", "--size", "320", "--out", out)
    assert code == 0, err
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert [(r["tile_size"], r["batch_size"]) for r in rows] == [("64", "1"), ("64", "2"), ("128", "1"), ("128", "2")]
    assert all(float(r["end_to_end_mpx_s"]) > 0 and float(r["halo_overhead"]) > 1 for r in rows)
    assert (out / "bench.png").stat().st_size > 1000 and (out / "bench.json").exists()
    assert "recommended: --tile-size" in stdout


def test_batch_mode_writes_one_zarr_per_slide_and_skips_finished_ones(capsys, tmp_path, rgb_image, model_file):
    import tifffile

    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", rgb_image, photometric="rgb")
    out = tmp_path / "results"
    args = ["segment", str(tmp_path / "*.tif"), str(out), "--model", str(model_file), "--tile-size", "32", "--quiet"]
    code, _, err = _run(capsys, *args)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a.zarr", "b.zarr"]
    code, _, err = _run(capsys, *args)
    assert code == 0 and err.count("finished earlier: skipped") == 2


def test_batch_mode_refuses_inputs_that_would_share_an_output(capsys, tmp_path, rgb_image, model_file):
    import tifffile

    for folder in ("siteA", "siteB"):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "001.svs.tif", rgb_image, photometric="rgb")
    code, _, err = _run(capsys, "segment", tmp_path / "siteA" / "001.svs.tif", tmp_path / "siteB" / "001.svs.tif",
                        tmp_path / "out", "--model", model_file, "--quiet")
    assert code == 2 and "several inputs would write 001.svs.zarr" in err


def test_import_and_help_load_no_heavy_library():
    # `tilesegment --help` must answer at once: torch, numba, zarr and dask load on first use.
    code = ("import sys, tilesegment; from tilesegment.cli import _parser; _parser().format_help(); "
            "print(sorted(m for m in ('torch', 'numba', 'zarr', 'dask', 'tifffile') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_resolves():
    import tilesegment

    for name in tilesegment.__all__:
        assert getattr(tilesegment, name) is not None, name
    assert set(tilesegment.__all__) <= set(dir(tilesegment))


@pytest.mark.parametrize("precision, said", [("fp32", "in fp32"), ("bf16", "in bf16 (not exact)")])
def test_the_plan_line_names_the_precision_and_that_reduced_ones_are_not_exact(capsys, rgb_tiff, model_file,
                                                                                tmp_path, precision, said):
    code, _, err = _run(capsys, "segment", rgb_tiff, tmp_path / "o.zarr", "--model", model_file,
                        "--tile-size", 64, "--precision", precision)
    assert code == 0, err
    assert re.search(rf"^plan .* batch 1 on cpu {re.escape(said)}$", err, re.M), err


def test_scheduler_local_gives_each_worker_its_own_gpu_and_refuses_more_workers_than_gpus(monkeypatch):
    import os

    from tilesegment.cli import _client

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(ts.UsageError, match="more workers than the 2 GPU"):
        _client("local:3").__enter__()
    with _client("local:2") as client:
        seen = client.run(os.getenv, "CUDA_VISIBLE_DEVICES")  # os.environ.get would pickle ours
        resources = [w["resources"] for w in client.scheduler_info()["workers"].values()]
    assert sorted(seen.values()) == ["0", "1"] and resources == [{"GPU": 1}] * 2


def test_a_failing_slide_does_not_stop_the_batch_and_resume_redoes_only_the_failed(
        capsys, tmp_path, rgb_image, model_file, monkeypatch):
    import tifffile

    from tilesegment import api

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in "acd":
        tifffile.imwrite(slides / f"{name}.tif", rgb_image, photometric="rgb")
    (slides / "b.tif").write_bytes(b"II*\x00" + b"\xff" * 100)  # a corrupt file
    prepare = api.prepare

    def failing(image, *args, **kwargs):  # d: an unexpected error, not a TileSegmentError
        if str(image).endswith("d.tif"):
            raise RuntimeError("too many open files")
        return prepare(image, *args, **kwargs)

    monkeypatch.setattr(api, "prepare", failing)
    out = tmp_path / "results"
    args = ["segment", *(slides / f"{n}.tif" for n in "abcd"), out, "--model", model_file, "--tile-size", 32,
            "--objects", "--quiet"]
    code, _, err = _run(capsys, *args)
    assert code == 1 and "Traceback" not in err
    summary = err[err.index("tilesegment: 2 of 4 inputs failed"):].strip().splitlines()
    assert len(summary) == 3 and "--resume to redo only those" in summary[0]
    assert re.fullmatch(rf"  {re.escape(str(slides / 'b.tif'))}: \S.*", summary[1])
    assert summary[2] == f"  {slides / 'd.tif'}: RuntimeError: too many open files"
    assert sorted(p.name for p in out.glob("*.zarr")) == ["a.zarr", "c.zarr"]  # c ran after b failed
    assert (out / "c.geojson.gz").exists()

    # The files fixed, the same command with --resume redoes only the failed slides.
    tifffile.imwrite(slides / "b.tif", rgb_image, photometric="rgb")
    monkeypatch.setattr(api, "prepare", prepare)
    before = (out / "a.zarr" / "0" / "c" / "0" / "0").stat().st_mtime_ns
    code, _, err = _run(capsys, *args, "--resume")
    assert code == 0, err
    assert err.count("finished earlier: skipped") == 2
    assert (out / "a.zarr" / "0" / "c" / "0" / "0").stat().st_mtime_ns == before
    for name in "abcd":
        assert zarr.open_group(out / f"{name}.zarr", mode="r").attrs["tilesegment"]["complete"]
        assert (out / f"{name}.objects.csv").exists() and (out / f"{name}.geojson.gz").exists()
