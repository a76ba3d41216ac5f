"""Failing loudly, early and safely: run-time errors and the checks before any work."""

import errno

import numpy as np
import pytest
import tifffile
import torch
import zarr
from hypothesis import given, settings, strategies as st

import tilesegment as ts
from tilesegment.cli import main
from tilesegment.io.manifest import Manifest

from conftest import small_unet


@pytest.fixture(scope="module")
def net():
    return small_unet(3, 3, base=4, depth=2, seed=3)


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (200, 180, 3), dtype=np.uint8)


class NaNAfter(torch.nn.Module):
    def __init__(self, net, y0):
        super().__init__()
        self.net, self.y0 = net, y0

    geometry = property(lambda self: self.net.geometry)

    def forward(self, x):
        out = self.net(x)
        if x.device.type != "meta":
            out[:, :, 5, 5] = float("nan")
        return out


def test_nan_in_model_output_is_reported_with_the_tile_position(net, image):
    with pytest.raises(ts.ModelOutputError, match=r"NaN or Inf in tile 0 at \(y, x\) = \(0, 0\)"):
        ts.segment(image, NaNAfter(net, 0), tile_size=64, progress=False)


def test_nan_is_caught_on_the_device_reduction_path_too(net, image):
    from tilesegment.executor import Executor
    from tilesegment.pipeline import run_pipeline

    tiler = ts.Tiler(image, net.geometry, tile_size=64)
    ex = Executor(NaNAfter(net, 0), "cpu", mode="labels", geometry=net.geometry, tile_size=(64, 64),
                  reduce_on_device=True)
    with pytest.raises(ts.ModelOutputError, match="tile 0"):
        with ts.Stitcher(tiler.plan) as stitcher:
            run_pipeline(tiler.batches(2), [ex], stitcher)


def _corrupt_tiff(path, image, tile_index=5):
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[tile_index]
    data = bytearray(path.read_bytes())
    data[offset : offset + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))
    return path


def test_a_corrupt_tile_fails_the_run_with_its_position_or_is_skipped_and_recorded(net, image, tmp_path):
    slide = _corrupt_tiff(tmp_path / "corrupt.tif", image)
    with pytest.raises(ts.TileReadError, match=r"cannot read tile \d+ at \(y, x\) = \(\d+, \d+\) of corrupt.tif"):
        ts.segment(slide, net, tmp_path / "a.zarr", tile_size=64, progress=False)
    out = ts.segment(slide, net, tmp_path / "b.zarr", tile_size=64, on_error="skip", progress=False)
    failed = zarr.open_group(tmp_path / "b.zarr").attrs["tilesegment"]["failed_tiles"]
    assert len(failed) >= 1
    for entry in failed:
        y, x = entry["origin"]
        assert (out[y : y + 64, x : x + 64] == 0).all()
    clean = ts.segment(image, net, tile_size=64, progress=False)
    failed_mask = np.zeros(image.shape[:2], bool)
    for entry in failed:
        y, x = entry["origin"]
        failed_mask[y : y + 64, x : x + 64] = True
    # Tiles whose padded input overlaps the corrupt source tile read it too; the rest are exact.
    assert (out[~failed_mask] == clean[~failed_mask]).mean() > 0.9


def test_cli_corrupt_tile_exits_1_with_one_line(net, image, tmp_path, capsys):
    slide = _corrupt_tiff(tmp_path / "corrupt.tif", image)
    model = ts.save_model(net, tmp_path / "m.pt")
    code = main(["segment", str(slide), str(tmp_path / "o.zarr"), "--model", str(model), "--tile-size", "64", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot read tile" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 6


def test_not_enough_disk_space_is_refused_before_work(net, image, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(ts.UsageError, match="GB are free"):
        ts.segment(image, net, tmp_path / "o.zarr", mode="logits", progress=False)
    assert not (tmp_path / "o.zarr").exists()


def test_a_tile_too_large_for_memory_is_refused_with_advice():
    import dask.array as da

    big = ts.UNet(3, 2, base_channels=64, depth=4)
    lazy = da.zeros((16384, 16384, 3), dtype=np.uint8, chunks=(4096, 4096, 3))  # nothing allocated
    with pytest.raises(ts.UsageError, match="tile_size 16384 needs about .* GB .*smaller tile_size"):
        ts.prepare(lazy, big, tile_size=16384, device="cpu")


def test_empty_file_is_an_input_error(net, tmp_path):
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(ts.InputError, match="not a readable TIFF"):
        ts.segment(tmp_path / "empty.tif", net, progress=False)


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder_is_refused(net, image, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(ts.UsageError, match="not writable"):
        ts.segment(image, net, folder / "o.zarr", progress=False)


def test_disk_full_midway_leaves_a_resumable_output(net, image, tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    real_set, writes = LocalStore.set, []

    async def failing_set(self, key, value):
        if "/c/" in key:
            writes.append(key)
            if len(writes) > 4:
                raise OSError(errno.ENOSPC, "No space left on device")
        await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", failing_set)
    out = tmp_path / "o.zarr"
    with pytest.raises(OSError, match="No space left"):
        ts.segment(image, net, out, tile_size=64, chunk_size=64, progress=False)
    assert len(Manifest(out).done_blocks()) >= 1
    monkeypatch.setattr(LocalStore, "set", real_set)
    resumed = ts.segment(image, net, out, tile_size=64, chunk_size=64, resume=True, progress=False)
    np.testing.assert_array_equal(resumed[:], ts.segment(image, net, tile_size=64, chunk_size=64, progress=False))


class RecordingArray:
    """An image that asserts every read stays inside it."""

    def __init__(self, shape):
        self.shape, self.dtype = shape, np.dtype(np.uint8)

    def __getitem__(self, index):
        ys, xs = index[0], index[1]
        assert 0 <= ys.start < ys.stop <= self.shape[0] and 0 <= xs.start < xs.stop <= self.shape[1], index
        return np.zeros((ys.stop - ys.start, xs.stop - xs.start), np.uint8)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 120), st.integers(1, 120)),
    halo=st.integers(0, 150),
    step=st.sampled_from([1, 2, 4, 8, 16]),
    tile_steps=st.integers(1, 6),
    mode=st.sampled_from(["reflect", "symmetric", "edge", "constant"]),
)
def test_loader_never_reads_outside_the_image_whatever_the_halo(shape, halo, step, tile_steps, mode):
    geom = ts.Geometry(halo=halo, step=step)
    tiler = ts.Tiler(RecordingArray(shape), geom, tile_size=step * tile_steps, padding=mode, axes="YX")
    for i in range(tiler.plan.n_tiles):
        tiler.read(i)


def test_failed_tiles_survive_a_resume(net, image, tmp_path, monkeypatch):
    slide = _corrupt_tiff(tmp_path / "corrupt.tif", image)
    straight = ts.segment(slide, net, tmp_path / "a.zarr", tile_size=64, chunk_size=64, on_error="skip", progress=False)
    expected = zarr.open_group(tmp_path / "a.zarr").attrs["tilesegment"]["failed_tiles"]
    calls = {"n": 0}
    original = ts.Stitcher.add

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # 4 of the 12 tiles are readable
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ts.Stitcher, "add", interrupting)
    with pytest.raises(KeyboardInterrupt):
        ts.segment(slide, net, tmp_path / "b.zarr", tile_size=64, chunk_size=64, on_error="skip", progress=False)
    assert Manifest(tmp_path / "b.zarr").done_blocks().size > 0  # really stopped midway
    monkeypatch.setattr(ts.Stitcher, "add", original)
    resumed = ts.segment(slide, net, tmp_path / "b.zarr", tile_size=64, chunk_size=64, on_error="skip", resume=True, progress=False)
    got = zarr.open_group(tmp_path / "b.zarr").attrs["tilesegment"]["failed_tiles"]
    assert sorted(e["tile"] for e in got) == sorted(e["tile"] for e in expected)
    np.testing.assert_array_equal(resumed[:], straight[:])
