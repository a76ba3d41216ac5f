"""Readers: one per format, chosen through the registry, and a plug-in added by entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import tilesegment as ts
from tilesegment.contracts import Reader
from tilesegment.io.sources import ImageSource
from tilesegment.registry import Registry, readers

PLUGINS = Path(__file__).resolve().parent / "plugins"
ROOT = Path(__file__).resolve().parents[1]


def _reader_for(target) -> str:
    return readers.first(lambda r: r.can_open(target)).name


def _with_plugins(tmp_path, *folders: Path) -> dict:
    """The environment of a subprocess that has `folders` (and this tree) on its path."""
    path = os.pathsep.join([*map(str, folders), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def test_readers_are_asked_by_priority_with_the_array_catch_all_last():
    names = readers.names()
    # OpenSlide before tifffile (a BIF starts like any TIFF), plain images after zarr
    assert names[:6] == ["openslide", "tiff", "dicom", "zarr", "czi", "plain"] and names[-1] == "array"
    priorities = [r.priority for r in readers]
    assert priorities == sorted(priorities)
    assert all(isinstance(r, Reader) for r in readers)


@pytest.mark.parametrize("target", [
    5, None, 2.5, b"slide.tif", object(), np.zeros(3), [1, 2], "missing.tif", Path("no/such.zarr"),
    "s3://bucket/slide.svs", "https://host/image.zarr/", "https://host/x?sig=a/b", "", "\0",
    "name\0with-nul.tif", "relative-folder",
])
def test_can_open_never_raises(target, tmp_path):
    for reader in readers:
        assert reader.can_open(target) in (True, False)
        assert reader.can_open(tmp_path) in (True, False)  # a folder
        assert reader.can_open(str(tmp_path / "missing")) is False or reader.name == "array"


def test_each_builtin_format_opens_what_it_did(tmp_path, rgb_image):
    tiff = tmp_path / "slide.tif"
    tifffile.imwrite(tiff, rgb_image, tile=(64, 64), photometric="rgb")
    plain = zarr.open_array(tmp_path / "plain.zarr", mode="w", shape=(40, 30), chunks=(16, 16), dtype="u1")
    plain[:] = 7
    group = zarr.open_group(tmp_path / "image.ome.zarr", mode="w")
    group.create_array("0", shape=(40, 30), chunks=(16, 16), dtype="u1")[:] = 9
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.5, 0.25]}]}]}]}
    cases = [(tiff, "tiff", "tiff", (150, 131)), (tmp_path / "plain.zarr", "zarr", "zarr", (40, 30)),
             (tmp_path / "image.ome.zarr", "zarr", "ome-zarr", (40, 30)),
             (np.zeros((20, 10), np.uint8), "array", "array", (20, 10))]
    for target, reader, fmt, shape in cases:
        assert _reader_for(target) == reader
        source = ts.open_image(target)
        assert (source.format, source.shape) == (fmt, shape)
        source.close()
    assert ts.open_image(tmp_path / "image.ome.zarr").pixel_size == (0.5, 0.25)
    assert _reader_for("s3://bucket/case.svs") == "tiff" and _reader_for("s3://bucket/out.zarr") == "zarr"
    assert _reader_for("https://host/store/") == "zarr"


def test_a_tiff_is_told_by_its_bytes_and_other_files_by_none(tmp_path, rgb_image):
    odd = tmp_path / "slide.bin"
    tifffile.imwrite(odd, rgb_image, photometric="rgb")
    np.testing.assert_array_equal(ts.open_image(odd).read(0, 150, 0, 131), rgb_image)
    text = tmp_path / "notes.tif"
    text.write_text("hello")
    with pytest.raises(ts.InputError, match=r"'notes.tif' is not a readable TIFF-family image \(.*b'hello'.*\); "
                                            r"supported: .*TIFF, SVS, OME-TIFF, NDPI, QPTIFF, .*OME-Zarr.*CZI.*PNG, JPEG"):
        ts.open_image(text)
    with pytest.raises(ts.InputError, match="a URL with this name.*supported: .*TIFF, SVS"):
        ts.open_image("s3://bucket/slide.unknown")


def test_a_closed_tiff_reopens_and_reads_the_same_pixels(tmp_path, rgb_image):
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, rgb_image, tile=(64, 64), photometric="rgb", compression="zlib")
    source = ts.open_image(path, channels=[2, 1, 0])
    before = source.read(10, 140, 5, 120)
    source.close()
    again = source.reopen()
    assert again is not source and again.channel_order == (2, 1, 0) and again.backend.decode_chunk is not None
    np.testing.assert_array_equal(again.read(10, 140, 5, 120), before)
    np.testing.assert_array_equal(again.read_chunk(1, 1), rgb_image[64:128, 64:128, ::-1])
    again.close()


def test_an_array_source_reopens_on_the_same_array():
    image = np.arange(600, dtype=np.uint16).reshape(20, 30)
    source = ts.open_image(image, axes="YX")
    again = source.reopen()
    assert again.array is image and again.axes == "YX"
    assert ImageSource(image, "YX").reopen().array is image


def test_a_level_chosen_by_mpp_decodes_its_own_chunks_and_reopens(tmp_path):
    from tilesegment.demo import write_tiff_pyramid

    yy, xx = np.mgrid[:1100, :1100]
    rgb = np.stack([(yy // 7) % 256, (xx // 5) % 256, (yy + xx) // 9 % 256], -1).astype(np.uint8)
    path = write_tiff_pyramid(tmp_path / "pyramid.tif", rgb, pixel_size=0.5)
    source = ts.open_image(path, mpp=1.0)  # exactly level 1: no resampling
    assert source.shape == (550, 550) and source.pixel_size == (1.0, 1.0)
    np.testing.assert_array_equal(source.read_chunk(1, 0), source.read(256, 512, 0, 256))
    assert source.reopen().shape == (550, 550)
    resampled = ts.open_image(path, mpp=1.5)
    np.testing.assert_array_equal(resampled.reopen().read(0, 50, 0, 50), resampled.read(0, 50, 0, 50))


def test_a_reader_registered_by_hand_with_a_lower_priority_comes_first(tmp_path, rgb_image):
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, rgb_image, photometric="rgb")

    class Inverting:
        name, priority, formats = "inverting", 5, "inverted TIFFs"

        def can_open(self, target):
            return str(target).endswith(".tif")

        def open(self, target, *, axes, level, series, storage_options, ndim):
            return ImageSource(255 - tifffile.imread(target), "YXS", name="inverted", format="inverted")

    readers.register("inverting", Inverting())
    try:
        assert readers.names()[0] == "inverting"
        source = ts.open_image(path)
        assert source.format == "inverted"
        np.testing.assert_array_equal(source.read(0, 5, 0, 5), 255 - rgb_image[:5, :5])
    finally:
        readers.unregister("inverting")
    assert ts.open_image(path).format == "tiff"


def test_a_demo_reader_installed_by_entry_point_reads_in_python_and_the_cli(tmp_path, model_file):
    sys.path.insert(0, str(PLUGINS))
    try:
        from tilesegment_demo_reader import write_demo
    finally:
        sys.path.remove(str(PLUGINS))
    image = np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    demo = write_demo(tmp_path / "x.demo", image, "YXS", pixel_size=(0.5, 0.5))
    with pytest.raises(ts.InputError, match="not a readable TIFF-family image"):
        ts.open_image(demo)  # not installed in this process
    env = _with_plugins(tmp_path, PLUGINS)
    script = textwrap.dedent(f"""
        import json, numpy as np, tilesegment as ts
        source = ts.open_image({str(demo)!r}, channels=[2, 1, 0])
        expected = np.load({str(tmp_path / "image.npy")!r})
        assert np.array_equal(source.read(0, 96, 0, 80), expected[..., ::-1])
        again = source.reopen()
        labels = ts.segment({str(demo)!r}, ts.load_model({str(model_file)!r}), tile_size=32, progress=False,
                            device="cpu")
        print(json.dumps([source.format, list(source.pixel_size), list(labels.shape), again.format]))
    """)
    np.save(tmp_path / "image.npy", image)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == ["demo", [0.5, 0.5], [96, 80], "demo"]
    out = tmp_path / "x.zarr"
    cli = subprocess.run([sys.executable, "-m", "tilesegment.cli", "segment", str(demo), str(out), "--model",
                          str(model_file), "--tile-size", "32", "--device", "cpu", "--quiet"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    written = zarr.open_group(out, mode="r")
    assert written["0"].shape == (96, 80)
    assert written.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.5, 0.5]


def test_a_reader_whose_entry_point_fails_is_skipped_with_a_warning(tmp_path, monkeypatch):
    broken = tmp_path / "broken_reader-0.1.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-reader\nVersion: 0.1\n")
    (broken / "entry_points.txt").write_text("[tilesegment.readers]\nbroken = no_such_module:Reader\n")
    readers.names()  # the global registry loads its entry points now, before the plug-ins are on the path
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh = Registry("reader", "tilesegment.readers")  # entry points only: the global registry is untouched
    with pytest.warns(UserWarning, match=r"reader 'broken' \(no_such_module:Reader\) failed to load"):
        names = fresh.names()
    assert names == ["demo"] and fresh.get("demo").can_open("x.demo")
    assert "broken" not in readers and "demo" not in readers
