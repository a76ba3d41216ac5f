"""Volumes and stacks: 3-d networks and 2-d networks over Z/T stacks, exact, into OME-Zarr."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import tifffile
import torch
import zarr
from hypothesis import HealthCheck, given, settings, strategies as st

import tilesegment as ts
from tilesegment.api import auto_tile_size
from tilesegment.io.ngff import downsample, pyramid_factors
from tilesegment.testing import assert_exact, assert_labels_match, planewise_logits, whole_image_logits

from conftest import small_unet

POOLINGS = {"isotropic": [(2, 2, 2), (2, 2, 2)], "anisotropic": [(1, 2, 2), (2, 2, 2)]}


def net3d(in_channels: int = 1, num_classes: int = 2, depth: int = 2, pooling: str = "anisotropic", seed: int = 0):
    torch.manual_seed(seed)
    net = ts.UNet(in_channels, num_classes, base_channels=2, depth=depth, ndim=3,
                  pooling=POOLINGS[pooling][:depth])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    return net.eval()


NETS = {(c, d, p): net3d(c, 3, d, p, seed=c + 3 * d) for c in (1, 2) for d in (1, 2) for p in POOLINGS}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channels=st.integers(1, 2),
    depth=st.integers(1, 2),
    pooling=st.sampled_from(sorted(POOLINGS)),
    shape=st.tuples(st.integers(1, 12), st.integers(1, 30), st.integers(1, 30)),
    tile_steps=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    dtype=st.sampled_from(["uint8", "float32"]),
    seed=st.integers(0, 2**16),
)
def test_tiled_volume_equals_whole_volume_inference(channels, depth, pooling, shape, tile_steps, dtype, seed):
    net = NETS[(channels, depth, pooling)]
    rng = np.random.default_rng(seed)
    volume = rng.integers(0, 256, (channels, *shape)).astype(dtype)
    tile = tuple(k * s for k, s in zip(tile_steps, net.geometry.step))
    expected = whole_image_logits(volume, net, axes="CZYX")
    tiled = ts.segment(volume, net, tile_size=tile, mode="logits", axes="CZYX", progress=False)
    assert tiled.shape == expected.shape == (3, *shape)
    assert_exact(tiled, expected)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    axes=st.sampled_from(["ZYX", "TYX", "YXZ", "CZYX"]),
    planes=st.integers(2, 5),
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    tile=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
    seed=st.integers(0, 2**16),
)
def test_2d_network_over_a_stack_equals_inference_plane_by_plane(axes, planes, size, tile, seed):
    net = small_unet(1, 3, base=4, depth=2, seed=seed % 5)
    rng = np.random.default_rng(seed)
    sizes = {"Z": planes, "T": planes, "Y": size[0], "X": size[1], "C": 1}
    stack = rng.random([sizes[a] for a in axes]).astype(np.float32)
    stack_axis = "T" if "T" in axes else "Z"
    expected = planewise_logits(stack, net, axes=axes)
    # A tile depth along the stack axis batches planes; it must not change anything.
    tiled = ts.segment(stack, net, tile_size=(tile[0], 4 * tile[1], 4 * tile[2]), mode="logits", axes=axes,
                       progress=False)
    if stack_axis == "T":  # NGFF puts time before channels
        expected = expected.swapaxes(0, 1)
    assert tiled.shape == expected.shape == (((3, planes) if stack_axis == "Z" else (planes, 3)) + size)
    assert_exact(tiled, expected)
    labels = ts.segment(stack, net, tile_size=8, axes=axes, progress=False)
    assert_labels_match(labels, expected, axis=0 if stack_axis == "Z" else 1)
    assert ts.Tiler(stack, net, tile_size=8, axes=axes).plan.axes == stack_axis.lower() + "yx"


def test_a_3d_network_over_a_time_series_runs_volume_by_volume():
    net = NETS[(1, 1, "anisotropic")]
    series = np.random.default_rng(3).random((3, 5, 18, 14)).astype(np.float32)
    tiled = ts.segment(series, net, tile_size=(2, 8, 8), mode="logits", axes="TZYX", progress=False)
    expected = np.stack([whole_image_logits(v, net, axes="ZYX") for v in series])
    assert tiled.shape == (3, 3, 5, 18, 14)  # (t, c, z, y, x), as NGFF orders them
    assert_exact(tiled, expected)


def test_tiler_and_stitcher_take_volumes(tmp_path):
    net = NETS[(1, 2, "isotropic")]
    volume = np.random.default_rng(4).random((9, 21, 17)).astype(np.float32)
    tiler = ts.Tiler(volume, net, tile_size=(4, 8, 8))
    assert tiler.plan.axes == "zyx" and tiler.plan.input_size == net.geometry.input_size((4, 8, 8))
    with ts.Stitcher(tiler.plan, tmp_path / "v.zarr", mode="logits") as stitcher:
        for batch in tiler.batches(3):
            assert batch.data.shape[1:] == (1, *tiler.plan.input_size)
            with torch.no_grad():
                stitcher.add(batch, net(torch.from_numpy(np.ascontiguousarray(batch.data))))
    assert_exact(stitcher.result[:], whole_image_logits(volume, net, axes="ZYX"))


def test_decoded_chunks_of_a_zarr_volume_are_read_once_and_equal_per_tile_reads():
    volume = zarr.create_array(store={}, shape=(13, 40, 37), chunks=(4, 16, 16), dtype="uint8")
    volume[:] = np.random.default_rng(5).integers(0, 256, (13, 40, 37), dtype=np.uint8)
    tiler = ts.Tiler(volume, ts.Geometry(halo=(2, 5, 5), step=(1, 4, 4), ndim=3), tile_size=(3, 8, 12))
    batches = list(tiler.batches(4, workers=2))
    for batch in batches:
        for k, index in enumerate(batch.indices):
            np.testing.assert_array_equal(batch.data[k], tiler.read(int(index)))
    grid = [-(-n // c) for n, c in zip(volume.shape, volume.chunks)]
    assert tiler.last_cache.decoded == np.prod(grid)  # every chunk touched, each once


def test_ome_tiff_volume_keeps_its_voxel_size_and_validates_as_ngff(tmp_path):
    import tifffile
    from ome_zarr_models.v04 import Image as Image04
    from ome_zarr_models.v05 import Image

    volume = np.random.default_rng(6).integers(0, 256, (6, 40, 52), dtype=np.uint8)
    path = tmp_path / "vol.ome.tif"
    tifffile.imwrite(path, volume, ome=True, tile=(16, 16),
                     metadata={"axes": "ZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeY": 0.5, "PhysicalSizeX": 0.5})
    source = ts.open_image(path)
    assert (source.plan_axes, source.shape, source.pixel_size) == ("ZYX", (6, 40, 52), (2.0, 0.5, 0.5))
    net = NETS[(1, 1, "anisotropic")]
    for ngff, model in (("0.5", Image), ("0.4", Image04)):
        out = tmp_path / f"seg{ngff}.zarr"
        result = ts.segment(path, net, out, tile_size=(2, 16, 16), ngff=ngff, progress=False)
        assert_labels_match(result[:], whole_image_logits(volume, net, axes="ZYX"))
        group = zarr.open_group(out, mode="r")
        model.from_zarr(group)
        meta = group.attrs.asdict()
        ms = meta.get("ome", meta)["multiscales"][0]
        assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
        assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [2.0, 0.5, 0.5]
    # Our output reads back as a volume, voxel size included.
    again = ts.open_image(tmp_path / "seg0.5.zarr")
    assert (again.plan_axes, again.pixel_size) == ("ZYX", (2.0, 0.5, 0.5))


def test_volume_pyramid_opens_in_the_ome_zarr_reader_as_a_multiscale(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    volume = zarr.create_array(store=str(tmp_path / "in.zarr"), shape=(8, 600, 520), chunks=(8, 128, 128),
                               dtype="uint8")
    volume[:] = np.random.default_rng(7).integers(0, 256, volume.shape, dtype=np.uint8)
    geometry = ts.Geometry(halo=(1, 2, 2), step=(1, 2, 2), shrink=(2, 4, 4))

    class Crop(torch.nn.Module):  # the geometry's valid network that costs nothing
        geometry = ts.Geometry(halo=(1, 2, 2), step=(1, 2, 2), shrink=(2, 4, 4))

        def forward(self, x):
            core = x[:, :, 1:-1, 2:-2, 2:-2]
            return torch.cat([core, 1 - core], 1)

    assert Crop.geometry == geometry
    out = tmp_path / "seg.zarr"
    ts.segment(str(tmp_path / "in.zarr"), Crop(), out, tile_size=(4, 128, 128), mode="probabilities",
               progress=False)
    nodes = list(Reader(parse_url(str(out)))())
    (multiscale,) = [s for n in nodes for s in n.specs if isinstance(s, Multiscales)]
    shapes = [tuple(level.shape) for level in nodes[0].data]
    # Isotropic voxels: every spatial axis halves each level, channels never.
    assert shapes == [(2, 8, 600, 520), (2, 4, 300, 260), (2, 2, 150, 130)]
    assert multiscale is not None


@given(
    shape=st.tuples(st.integers(1, 300), st.integers(1, 5000), st.integers(1, 5000)),
    size=st.tuples(st.floats(0.1, 10), st.floats(0.1, 2)),
)
def test_pyramid_halves_y_and_x_and_z_only_once_it_is_no_coarser(shape, size):
    z_size, xy_size = size
    factors = pyramid_factors((2, *shape), "czyx", (z_size, xy_size, xy_size))
    previous = (1, 1, 1, 1)
    for f in factors:
        assert f[0] == 1  # channels are never downsampled
        assert all(a in (b, 2 * b) for a, b in zip(f, previous))
        assert f[2:] == tuple(2 * p if -(-n // p) > 1 else p for p, n in zip(previous[2:], shape[1:]))
        if f[1] > previous[1]:  # z halves only when not coarser than 1.5x the new y/x voxel
            assert z_size * f[1] <= 1.5 * 2 * xy_size * f[2] + 1e-9
        previous = f
    final = factors[-1] if factors else (1, 1, 1, 1)
    assert max(-(-shape[1] // final[2]), -(-shape[2] // final[3])) <= 256


def test_downsample_keeps_labels_and_averages_values():
    block = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    np.testing.assert_array_equal(downsample(block, (2, 2, 2), labels=True), block[::2, ::2, ::2])
    values = np.random.default_rng(0).random((2, 3, 5)).astype(np.float32)
    mean = downsample(values, (1, 2, 2), labels=False)
    padded = np.pad(values, [(0, 0), (0, 1), (0, 1)], mode="edge")
    expected = (padded[:, ::2, ::2] + padded[:, 1::2, ::2] + padded[:, ::2, 1::2] + padded[:, 1::2, 1::2]) / 4
    np.testing.assert_array_equal(mean, expected)  # bit for bit what 2-d pyramids always had
    cube = downsample(values, (2, 2, 2), labels=False)
    assert_exact(cube, np.pad(values, [(0, 0), (0, 1), (0, 1)], mode="edge").reshape(1, 2, 2, 2, 3, 2).mean((1, 3, 5)))


def test_volume_inputs_are_refused_where_only_images_make_sense(tmp_path):
    net = NETS[(1, 1, "anisotropic")]
    with pytest.raises(ts.UsageError, match="axes"):
        ts.segment(np.zeros((30, 30), np.float32), net, progress=False)
    with pytest.raises(ts.UsageError, match="axes TYX"):  # time is not depth
        ts.segment(np.zeros((4, 30, 30), np.float32), net, axes="TYX", progress=False)
    stack = np.zeros((3, 30, 30), np.uint8)
    with pytest.raises(ts.UsageError, match="2-d images"):
        ts.segment(stack, small_unet(1, 2), axes="ZYX", tissue_mask=np.ones((30, 30), bool), progress=False)
    with pytest.raises(ts.InputError, match="level="):
        ts.open_image(stack, axes="ZYX", mpp=1.0)
    with pytest.raises(ts.InvalidTileSize, match="tile_size 3 along z .* step 2; nearest valid: 2 or 4"):
        ts.segment(stack, NETS[(1, 2, "anisotropic")], tile_size=(3, 8, 8), axes="ZYX", progress=False)


def test_auto_tile_size_keeps_z_thin_for_an_anisotropic_network():
    net = ts.UNet(1, 2, base_channels=4, depth=3, ndim=3, pooling=[(1, 2, 2), (1, 2, 2), (2, 2, 2)])
    tile = ts.Tiler(np.zeros((200, 2000, 2000), np.uint8), net,
                    tile_size=auto_tile_size((200, 2000, 2000), net.geometry, torch.device("cpu"), net, 1)
                    ).plan.tile_size
    assert tile[1] == tile[2] and tile[0] < tile[1] and tile[0] % net.geometry.step[0] == 0
    small = auto_tile_size((3, 20, 20), net.geometry, torch.device("cpu"), net, 1)
    assert small == (4, 24, 24)  # never much larger than the volume (z step 2, y/x step 8)
    tight = auto_tile_size((200, 2000, 2000), net.geometry, torch.device("cpu"), net, 1,
                                  memory_budget=60 << 20)
    assert tight[1] < tile[1]  # a smaller budget gives a smaller tile


def test_cli_segments_a_volume_with_a_tile_size_per_axis(tmp_path, capsys):
    import tifffile

    from tilesegment.cli import main

    volume = np.random.default_rng(8).integers(0, 256, (5, 30, 40), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "v.ome.tif", volume, ome=True, metadata={"axes": "ZYX"})
    net = NETS[(1, 1, "anisotropic")]
    ts.save_model(net, tmp_path / "net3d.pt")
    out = tmp_path / "seg.zarr"
    assert main(["segment", str(tmp_path / "v.ome.tif"), str(out), "--model", str(tmp_path / "net3d.pt"),
                 "--tile-size", "2,16,16", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "z 5 x y 30 x x 40" in err and "tile z 2 x y 16 x x 16" in err
    assert_labels_match(zarr.open_array(out / "0", mode="r")[:], whole_image_logits(volume, net, axes="ZYX"))


def test_time_lapse_probabilities_are_stored_time_first_and_validate(tmp_path):
    from ome_zarr_models.v05 import Image

    net = small_unet(1, 3, base=4, depth=2)
    series = np.random.default_rng(9).random((3, 30, 26)).astype(np.float32)
    out = ts.segment(series, net, tmp_path / "t.zarr", mode="probabilities", axes="TYX", tile_size=16,
                     progress=False)
    assert out.metadata.dimension_names == ("t", "c", "y", "x") and out.shape == (3, 3, 30, 26)
    Image.from_zarr(zarr.open_group(tmp_path / "t.zarr", mode="r"))
    in_memory = ts.segment(series, net, mode="probabilities", axes="TYX", tile_size=16, progress=False)
    np.testing.assert_array_equal(out[:], in_memory)


@settings(max_examples=4, deadline=None)
@given(pooling=st.lists(st.sampled_from([(1, 2, 2), (2, 2, 2), (2, 1, 1)]), min_size=1, max_size=3))
def test_probe_finds_the_geometry_of_any_3d_unet_per_axis(pooling):
    from tilesegment._probe import probe_geometry

    net = ts.UNet(1, 2, base_channels=2, depth=len(pooling), ndim=3, pooling=pooling)
    assert probe_geometry(net) == net.geometry
    scripted = torch.jit.script(net)
    assert ts.Geometry.of(scripted) == net.geometry  # no analytic geometry: probed


def test_a_stopped_volume_run_resumes_to_the_same_output(tmp_path, monkeypatch):
    from tilesegment.io.manifest import Manifest

    net = NETS[(1, 2, "anisotropic")]
    volume = np.random.default_rng(10).integers(0, 256, (8, 40, 40), dtype=np.uint8)
    zarr.save_array(str(tmp_path / "in.zarr"), volume)
    out, calls = tmp_path / "out.zarr", {"n": 0}
    original_add = ts.Stitcher.add

    def interrupting_add(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return original_add(self, *args, **kwargs)

    monkeypatch.setattr(ts.Stitcher, "add", interrupting_add)
    with pytest.raises(KeyboardInterrupt):
        ts.segment(tmp_path / "in.zarr", net, out, tile_size=(2, 16, 16), progress=False)
    done = Manifest(out).done_blocks()
    assert 0 < len(done) < 12
    monkeypatch.setattr(ts.Stitcher, "add", original_add)
    job = ts.prepare(tmp_path / "in.zarr", net, out, tile_size=(2, 16, 16), resume=True)
    assert job.resume and set(job.done_blocks) == set(done)
    job.run(progress=False)
    # Resumed, the same plan gives the same bytes as one uninterrupted run.
    np.testing.assert_array_equal(zarr.open_array(out / "0", mode="r")[:],
                                  ts.segment(volume, net, tile_size=(2, 16, 16), progress=False))


def test_distributed_volume_and_stack_equal_the_local_run(tmp_path):
    distributed = pytest.importorskip("distributed")

    net = NETS[(2, 1, "isotropic")]
    volume = np.random.default_rng(11).random((2, 6, 40, 36)).astype(np.float32)
    zarr.save_array(str(tmp_path / "in.zarr"), volume)
    local = ts.segment(volume, net, tile_size=(2, 16, 16), mode="probabilities", axes="CZYX", progress=False)
    # A time-lapse with a named one-plane Z, as 5-d OME-Zarr files have, under a 2-d network.
    series = np.random.default_rng(15).random((3, 1, 40, 36)).astype(np.float32)
    zarr.save_array(str(tmp_path / "series.zarr"), series)
    net2d = small_unet(1, 2, base=4, depth=2)
    local_series = ts.segment(series, net2d, tile_size=16, axes="TZYX", progress=False)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as client:
        remote = ts.segment(str(tmp_path / "in.zarr"), net, tmp_path / "out.zarr", tile_size=(2, 16, 16),
                            mode="probabilities", axes="CZYX", client=client, progress=False)
        remote_series = ts.segment(str(tmp_path / "series.zarr"), net2d, tmp_path / "series_out.zarr",
                                   tile_size=16, axes="TZYX", client=client, progress=False)
    np.testing.assert_array_equal(remote[:], local)
    assert remote.metadata.dimension_names == ("c", "z", "y", "x")
    np.testing.assert_array_equal(remote_series[:], local_series)
    assert remote_series.metadata.dimension_names == ("t", "y", "x")


@pytest.mark.parametrize("kind", ["volume", "stack"])
def test_gpu_style_path_for_volumes_matches_the_host_kernels(kind):
    """uint8 batches normalized on the device, channels-last (NDHWC), cropped and reduced
    there: the CUDA path, exercised on the CPU."""
    from tilesegment.executor import Executor
    from tilesegment.pipeline import run_pipeline

    volume = np.random.default_rng(12).integers(0, 256, (5, 37, 29), dtype=np.uint8)
    net = NETS[(1, 2, "anisotropic")] if kind == "volume" else small_unet(1, 3, base=4, depth=2)
    tiler = ts.Tiler(volume, net, tile_size=(2, 16, 16) if kind == "volume" else 16, axes="ZYX")
    model = net if kind == "volume" else ts.PlaneWise(net, 1)
    for mode in ("labels", "probabilities"):
        ex = Executor(model, "cpu", mode=mode, geometry=tiler.plan.geometry, tile_size=tiler.plan.tile_size,
                      reduce_on_device=True, input_affine=(tiler.scale, tiler.offset))
        with ts.Stitcher(tiler.plan, mode=mode) as stitcher:
            run_pipeline(tiler.batches(3, normalize=False, channels_last=True), [ex], stitcher)
        host = ts.segment(volume, net, tile_size=tiler.plan.tile_size[-3:], mode=mode, axes="ZYX", progress=False)
        assert np.abs(stitcher.result.astype(int) - host).max() <= (0 if mode == "labels" else 1)


def test_bench_sweeps_volume_tiles_per_axis(tmp_path, capsys):
    import csv

    from tilesegment.cli import main

    ts.save_model(NETS[(1, 2, "anisotropic")], tmp_path / "net3d.pt")
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tmp_path / "net3d.pt"), "--tile-sizes", "8,16", "--batch-sizes", "1",
                 "--size", "256", "--device", "cpu", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "bench.csv").open()))
    # z in proportion to the step: (2, 4, 4) -> a tile half as deep as it is wide
    assert [r["tile"] for r in rows] == ["4x8x8", "8x16x16"]
    assert all(float(r["end_to_end_mpx_s"]) > 0 and float(r["gflop_per_px"]) > 0 for r in rows)
    assert "recommended: --tile-size " in capsys.readouterr().out


def test_objects_of_a_stack_are_3d_and_a_time_series_is_refused(tmp_path):
    net = small_unet(1, 2, base=4, depth=2, seed=1)
    stack = np.random.default_rng(13).random((3, 30, 26)).astype(np.float32)
    z = ts.segment(stack, net, tmp_path / "z.zarr", axes="ZYX", tile_size=16, progress=False)
    objs = ts.label_objects(tmp_path / "z.zarr", classes=[1], progress=False)
    from scipy import ndimage

    assert objs.table.shape[0] == ndimage.label(z[:] == 1)[1]  # connected through z
    ts.segment(stack, net, tmp_path / "t.zarr", axes="TYX", tile_size=16, progress=False)
    with pytest.raises(ts.InputError, match="time axis"):
        ts.label_objects(tmp_path / "t.zarr")


def test_imagej_hyperstack_axes_and_voxel_size(tmp_path):
    import tifffile

    data = np.random.default_rng(14).integers(0, 256, (2, 4, 2, 20, 30), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "h.tif", data, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "TZCYX", "spacing": 2.5, "unit": "micron"})
    source = ts.open_image(tmp_path / "h.tif")
    assert (source.plan_axes, source.shape, source.channels) == ("TZYX", (2, 4, 20, 30), 2)
    assert source.pixel_size == (1.0, 2.5, 0.5, 0.5)
    np.testing.assert_array_equal(source.read_region((0, 0, 0, 0), source.shape), np.moveaxis(data, 2, -1))


def test_stack_planes_and_large_chunks_are_decoded_once():
    stack = zarr.create_array(store={}, shape=(8, 300, 280), chunks=(8, 64, 64), dtype="uint8")
    stack[:] = np.random.default_rng(16).integers(0, 256, stack.shape, dtype=np.uint8)
    tiler = ts.Tiler(stack, ts.Geometry(halo=6, step=4), tile_size=64, axes="ZYX")
    blocks = tiler.plan.block_origins[: tiler.plan.shape[0]]
    assert (blocks[:, 1:] == blocks[0, 1:]).all()  # the planes of one column come one after another
    for _ in tiler.batches(2, workers=2):
        pass
    assert tiler.last_cache.decoded == 5 * 5  # each 8-plane chunk once, not once per plane
    planes = zarr.create_array(store={}, shape=(6, 300, 280), chunks=(1, 64, 64), dtype="uint8")
    planes[:] = 1
    tiler = ts.Tiler(planes, ts.Geometry(halo=6, step=4), tile_size=64, axes="ZYX")
    assert (np.diff(tiler.plan.block_origins[:, 0]) >= 0).all()  # one-plane chunks: plane by plane
    for _ in tiler.batches(2, workers=2):
        pass
    assert tiler.last_cache.decoded == 6 * 5 * 5
    volume = zarr.create_array(store={}, shape=(16, 128, 128), chunks=(16, 128, 128), dtype="uint16")
    volume[:] = 1
    tiler = ts.Tiler(volume, ts.Geometry(halo=(2, 4, 4), step=(2, 4, 4), ndim=3), tile_size=(4, 32, 32))
    for _ in tiler.batches(1):
        pass
    assert tiler.last_cache.decoded == 1  # a chunk larger than the default budget stays while needed


def test_a_tiff_axes_override_may_name_z_and_plans_of_four_axes_name_them(tmp_path):
    import tifffile

    data = np.random.default_rng(17).integers(0, 256, (3, 40, 36), dtype=np.uint8)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, data, tile=(16, 16), photometric="minisblack")
    source = ts.open_image(path, axes="ZYX", ndim=3)
    assert source.plan_axes == "ZYX" and source.shape == (3, 40, 36)
    plan = ts.TilePlan.build((2, 3, 40, 40), ts.Geometry(halo=0, step=1).stacked(2), 8)
    assert plan.axes == "tzyx" and plan.position(1).startswith("(t, z, y, x) = ")
    with ts.Stitcher(plan, mode="logits") as stitcher:
        for i in range(plan.n_tiles):
            stitcher.add([i], np.ones((1, 1, 1, 1, 8, 8), np.float32))
    assert stitcher.result.shape == (2, 1, 3, 40, 40)  # (t, c, z, y, x)


def test_only_the_cli_turns_off_glibcs_growing_mmap_threshold_for_volumes(monkeypatch, tmp_path):
    import tilesegment.process as process
    from tilesegment.cli import main

    calls = []
    monkeypatch.setattr(process, "return_large_buffers", lambda: calls.append(1) or True)
    volume = np.zeros((2, 20, 20), np.float32)
    ts.segment(volume, NETS[(1, 1, "anisotropic")], tile_size=(2, 16, 16), progress=False)
    assert calls == []  # a library call leaves the caller's process as it is
    model = ts.save_model(NETS[(1, 1, "anisotropic")], tmp_path / "m.pt")
    tifffile.imwrite(tmp_path / "v.tif", volume, imagej=True, metadata={"axes": "ZYX"})
    assert main(["segment", str(tmp_path / "v.tif"), str(tmp_path / "v.zarr"), "--model", str(model),
                 "--quiet", "--tile-size", "2,16,16"]) == 0
    assert calls == [1]  # the CLI owns its process: volume runs return large buffers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_return_large_buffers_sets_glibcs_mmap_threshold_once(monkeypatch):
    import ctypes

    import tilesegment._heap as heap

    class FakeLibc:
        def __init__(self, result):
            self.calls = []

            def mallopt(*args):  # a function, so that argtypes can be set on it as on ctypes'
                self.calls.append(args)
                return result

            self.mallopt = mallopt

    glibc = FakeLibc(1)
    monkeypatch.setattr(heap, "_set", False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: glibc)
    assert heap.return_large_buffers() and heap.return_large_buffers()
    assert glibc.calls == [(-3, 1 << 20)]  # M_MMAP_THRESHOLD, 1 MiB; the second call sets nothing
    refused = FakeLibc(0)  # mallopt says no: reported, and asked again next time
    monkeypatch.setattr(heap, "_set", False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: refused)
    assert not heap.return_large_buffers() and not heap.return_large_buffers()
    assert len(refused.calls) == 2
    monkeypatch.setattr(heap, "_set", False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # musl: no mallopt at all
    assert heap.return_large_buffers() is False


def test_segment_objects_on_a_stack_writes_the_table_and_no_geojson(tmp_path):
    from tilesegment.cli import main

    ts.save_model(small_unet(1, 2, base=4, depth=2, seed=2), tmp_path / "net.pt")
    zarr.save_array(str(tmp_path / "in.zarr"), np.random.default_rng(18).random((3, 40, 40)).astype(np.float32))
    out = tmp_path / "seg.zarr"
    assert main(["segment", str(tmp_path / "in.zarr"), str(out), "--model", str(tmp_path / "net.pt"),
                 "--axes", "ZYX", "--tile-size", "16", "--objects", "--quiet"]) == 0
    assert (tmp_path / "seg.objects.csv").exists() and not (tmp_path / "seg.geojson.gz").exists()
    assert zarr.open_array(out / "labels" / "objects" / "0", mode="r").shape == (3, 40, 40)


def test_a_wrapped_model_without_convolutions_keeps_its_channel_check_over_a_stack():
    class Declared(torch.nn.Module):  # like an ONNX or service wrapper: no convolution to inspect
        in_channels = 1
        geometry = ts.Geometry(halo=2, step=4, shrink=4)

        def forward(self, x):
            return x[:, :1, 2:-2, 2:-2].repeat(1, 2, 1, 1)

    stack = np.zeros((3, 2, 30, 30), np.float32)
    with pytest.raises(ts.ModelError, match="expects 1 input channel"):
        ts.segment(stack, Declared(), axes="CZYX", tile_size=8, progress=False)
    assert ts.PlaneWise(Declared(), 1).in_channels == 1
