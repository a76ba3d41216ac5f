import dask.array as da
import numpy as np
import pytest
import zarr

import tilesegment as ts
from tilesegment.testing import whole_image_logits

from conftest import small_unet


@pytest.fixture(scope="module")
def net():
    return small_unet(3, 3, base=4, depth=2)


def _as_source(kind, image, tmp_path):
    if kind == "numpy":
        return image
    if kind == "dask":
        return da.from_array(image, chunks=(40, 40, 3))
    if kind == "zarr":
        z = zarr.create_array(tmp_path / "in.zarr", shape=image.shape, chunks=(32, 32, 3), dtype=image.dtype)
        z[:] = image
        return z
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["numpy", "dask", "zarr"])
def test_segment_reads_numpy_dask_and_zarr_arrays_identically(kind, net, rgb_image, tmp_path):
    expected = whole_image_logits(rgb_image, net)
    out = ts.segment(_as_source(kind, rgb_image, tmp_path), net, tile_size=32, mode="logits", progress=False)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_segment_reads_tiled_tiff_lazily_and_writes_valid_ome_zarr(net, rgb_tiff, rgb_image, tmp_path):
    from ome_zarr_models.v05.image import Image

    out_path = tmp_path / "out.zarr"
    result = ts.segment(rgb_tiff, net, out_path, tile_size=48, chunk_size=96, progress=False)
    assert isinstance(result, zarr.Array)
    assert result.shape == rgb_image.shape[:2] and result.dtype == np.uint8
    assert result.metadata.dimension_names == ("y", "x")
    labels = whole_image_logits(rgb_image, net).argmax(0)
    assert (result[:] == labels).mean() >= 0.9999
    group = zarr.open_group(out_path, mode="r")
    Image.from_zarr(group)  # strict NGFF 0.5 validation
    scale = group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == pytest.approx([2.0, 2.0])  # 5000 px/cm


def test_probabilities_to_zarr_have_channel_axis_and_validate(net, rgb_image, tmp_path):
    from ome_zarr_models.v05.image import Image

    result = ts.segment(rgb_image, net, tmp_path / "p.zarr", tile_size=32, mode="probabilities", progress=False)
    assert result.shape == (3, *rgb_image.shape[:2])
    assert result.metadata.dimension_names == ("c", "y", "x")
    Image.from_zarr(zarr.open_group(tmp_path / "p.zarr", mode="r"))
    total = result[:].astype(int).sum(0)
    assert np.abs(total - 255).max() <= 2  # softmax sums to one, up to rounding


def test_existing_output_is_never_touched_without_overwrite(net, rgb_image, tmp_path):
    out = tmp_path / "out.zarr"
    ts.segment(rgb_image, net, out, tile_size=32, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ts.OutputExistsError, match="exists; pass overwrite=True"):
        ts.segment(rgb_image[::-1], net, out, tile_size=32, progress=False)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_overwrite_replaces_output_only_when_the_new_one_is_complete(net, rgb_image, tmp_path):
    out = tmp_path / "out.zarr"
    first = ts.segment(rgb_image, net, out, tile_size=32, progress=False)[:]

    class Boom(Exception):
        pass

    class Failing(type(net)):
        calls = 0

        def forward(self, x):
            Failing.calls += x.device.type != "meta"  # shape probes do not count
            if Failing.calls > 2:
                raise Boom()
            return super().forward(x)

    failing = Failing(3, 3, base_channels=4, depth=2)
    with pytest.raises(Boom):
        ts.segment(rgb_image[::-1].copy(), failing, out, tile_size=32, overwrite=True, progress=False)
    np.testing.assert_array_equal(zarr.open_array(out / "0", mode="r")[:], first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]  # no temporary left behind

    second = ts.segment(rgb_image[::-1].copy(), net, out, tile_size=32, overwrite=True, progress=False)
    assert not np.array_equal(second[:], first)


def test_channel_count_mismatch_names_both_counts(net):
    with pytest.raises(ts.ModelError, match="expects 3 input channel.*has 1"):
        ts.segment(np.zeros((40, 40), np.uint8), net, progress=False)


def test_missing_and_non_image_inputs_are_input_errors(net, tmp_path):
    with pytest.raises(ts.InputError, match="does not exist"):
        ts.segment(tmp_path / "nope.tif", net, progress=False)
    text = tmp_path / "notes.tif"
    text.write_text("not an image")
    with pytest.raises(ts.InputError, match="not a readable TIFF"):
        ts.segment(text, net, progress=False)


def test_auto_tile_size_never_exceeds_the_image_rounded_to_the_step(net):
    job = ts.prepare(np.zeros((20, 70, 3), np.uint8), net, device="cpu")
    assert job.plan.tile_size == (20, 72) and job.plan.n_tiles == 1


def test_model_normalization_is_applied_by_the_loader(rgb_image):
    plain = small_unet(3, 2, base=4, depth=2, seed=9)
    normed = ts.UNet(3, 2, base_channels=4, depth=2, normalization=((0.5, 0.4, 0.3), (0.2, 0.25, 0.5)))
    normed.load_state_dict(plain.state_dict())
    x = (rgb_image / 255.0 - [0.5, 0.4, 0.3]) / [0.2, 0.25, 0.5]
    expected = ts.segment(x.astype(np.float32), plain, tile_size=32, mode="logits", progress=False)
    got = ts.segment(rgb_image, normed, tile_size=32, mode="logits", progress=False)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_output_that_is_the_input_is_refused_before_anything_is_touched(net, rgb_image, tmp_path):
    src = tmp_path / "in.zarr"
    z = zarr.create_array(src, shape=rgb_image.shape, chunks=(64, 64, 3), dtype=np.uint8)
    z[:] = rgb_image
    for out in (src, src / "labels.zarr"):
        with pytest.raises(ts.UsageError, match="is \\(or contains, or is inside\\) the input"):
            ts.segment(src, net, out, overwrite=True, progress=False)
    np.testing.assert_array_equal(zarr.open_array(src, mode="r")[:], rgb_image)


def test_existing_zarr_store_output_needs_overwrite(net, rgb_image):
    store = zarr.storage.MemoryStore()
    ts.segment(rgb_image, net, store, tile_size=32, progress=False)
    with pytest.raises(ts.OutputExistsError, match="already holds a zarr group"):
        ts.segment(rgb_image, net, store, tile_size=32, progress=False)
    ts.segment(rgb_image, net, store, tile_size=32, overwrite=True, progress=False)


def test_float16_images_are_read_as_float32(net, rgb_image):
    half = (rgb_image / 255).astype(np.float16)
    a = ts.segment(half, net, tile_size=32, mode="logits", progress=False)
    b = ts.segment(half.astype(np.float32), net, tile_size=32, mode="logits", progress=False)
    np.testing.assert_array_equal(a, b)


def test_failed_fresh_output_is_removed(net, rgb_image, tmp_path):
    class Boom(Exception):
        pass

    def explode(*_):
        raise Boom()

    failing = small_unet(3, 3, base=4, depth=2)
    failing.head.register_forward_hook(lambda m, i, o: explode() if o.device.type != "meta" else None)
    with pytest.raises(Boom):
        ts.segment(rgb_image, failing, tmp_path / "fresh.zarr", tile_size=32, progress=False)
    assert not (tmp_path / "fresh.zarr").exists()


def test_segment_has_every_option_of_prepare_with_the_same_default():
    import inspect

    seg, prep = (inspect.signature(f).parameters for f in (ts.segment, ts.prepare))
    assert {name: p.default for name, p in prep.items()} == {
        name: seg[name].default for name in prep}
    assert set(seg) - set(prep) == {"progress", "cancel"}  # what only Job.run takes


def test_a_job_runs_twice_from_a_file_and_closes_it_when_done(rgb_tiff, net):
    job = ts.prepare(rgb_tiff, net, tile_size=32)
    first, _ = job.run(progress=False)
    second, _ = job.run(progress=False)  # the TIFF is still open: a GUI may run a job again
    np.testing.assert_array_equal(first, second)
    handles = [r for r in job.tiler.source.backend.resources if hasattr(r, "filehandle")]
    assert handles and not handles[0].filehandle.closed
    with job:
        pass
    assert handles[0].filehandle.closed


def test_cuda_budgets_count_the_blocks_torch_caches_but_no_tensor_uses(monkeypatch):
    """A second slide in a folder run gets the tiles of the first: the allocator's cache is free to it."""
    import torch

    from tilesegment.executor import default_budget

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 5000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 600)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 200)
    assert default_budget(torch.device("cuda", 0), "plan") == int(0.7 * 1400)
    assert default_budget(torch.device("cuda", 0), "limit") == int(0.9 * 1400)


def test_the_record_and_the_executors_hold_the_resolved_precision_and_tile_size(rgb_tiff, net, tmp_path,
                                                                               monkeypatch):
    import tilesegment.executor

    monkeypatch.setattr(tilesegment.executor, "default_precision", lambda device: "bf16")  # as on a GPU
    with ts.prepare(rgb_tiff, net, tmp_path / "o.zarr") as job:
        assert job.compute.precision == job.record["precision"] == "bf16"
        assert job.executors()[0].precision == "bf16"
        assert job.record["tile_size"] == list(job.plan.tile_size)  # "auto" resolved, for resume
