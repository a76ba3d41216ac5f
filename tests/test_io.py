"""Whole-slide formats in, OME-Zarr out, background skipped."""

import numpy as np
import pytest
import tifffile
import zarr

import tilesegment as ts
from tilesegment.io.resample import ResampledSource
from tilesegment.testing import whole_image_logits

from conftest import small_unet

NET3 = small_unet(3, 3, base=4, depth=2, seed=21)
NET1 = small_unet(1, 2, base=4, depth=2, seed=22)


def _exact(path_or_array, net, **kwargs):
    """Tiled logits of `path_or_array` and the whole-image reference of the same pixels."""
    source = ts.open_image(path_or_array, **{k: v for k, v in kwargs.items() if k in ("series", "channels", "axes", "mpp", "level")})
    pixels = source.read(0, source.shape[0], 0, source.shape[1])
    expected = whole_image_logits(np.ascontiguousarray(pixels), net, axes="YXC" if pixels.shape[-1] not in (3, 4) else None)
    tiled = ts.segment(path_or_array, net, tile_size=32, mode="logits", progress=False, **kwargs)
    assert np.abs(tiled - expected).max() <= 1e-5 * np.abs(expected).max()
    return source


@pytest.fixture
def rgb(rng=np.random.default_rng(5)):
    return rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)


def test_svs_like_jpeg_pyramid_is_read_lazily_with_its_pixel_size(tmp_path, rgb):
    path = tmp_path / "slide.svs"
    desc = "Aperio Image Library v12.0.15\r\n260x300 [0,0 260x300] (64x64) JPEG/RGB Q=90|AppMag = 20|MPP = 0.4990"
    with tifffile.TiffWriter(path) as tif:
        plain = dict(photometric="rgb", metadata=None)  # no tifffile "shaped" tag: parse as SVS
        tif.write(rgb, tile=(64, 64), compression="jpeg", description=desc, **plain)
        tif.write(rgb[::8, ::8], description="Aperio Image Library thumbnail", **plain)
        tif.write(rgb[::2, ::2], tile=(64, 64), compression="jpeg", description="Aperio level", **plain)
    source = _exact(path, NET3)
    assert source.format == "svs" and source.pixel_size == pytest.approx((0.499, 0.499))
    assert [lv.shape for lv in source.levels] == [(300, 260), (150, 130)]


def test_ome_tiff_16bit_cyx_with_channel_reordering(tmp_path):
    data = np.random.default_rng(1).integers(0, 65535, (3, 130, 110), dtype=np.uint16)
    path = tmp_path / "multi.ome.tif"
    tifffile.imwrite(path, data, ome=True, tile=(64, 64), metadata={"axes": "CYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
    source = _exact(path, NET3, channels=[2, 0, 1])
    assert source.format == "ome-tiff" and source.axes == "CYX" and source.pixel_size == (0.25, 0.25)
    np.testing.assert_array_equal(source.read(0, 5, 0, 5)[..., 0], data[2, :5, :5])


def test_multi_series_tiff_selects_the_series(tmp_path, rgb):
    gray = np.random.default_rng(2).integers(0, 255, (90, 70), dtype=np.uint8)
    path = tmp_path / "two.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, photometric="rgb", metadata={"axes": "YXS"})
        tif.write(gray, metadata={"axes": "YX"})
    source = _exact(path, NET1, series=1)
    assert source.shape == (90, 70) and source.channels == 1
    with pytest.raises(ts.InputError, match="series 2 is out of range.*2 series"):
        ts.open_image(path, series=2)


def test_single_channel_tiff_with_singleton_z_squeezed(tmp_path):
    data = np.random.default_rng(3).integers(0, 4095, (1, 1, 120, 100), dtype=np.uint16)
    path = tmp_path / "gray.tif"
    tifffile.imwrite(path, data, tile=(32, 32), metadata={"axes": "TZYX"})
    source = _exact(path, NET1)
    assert source.channels == 1 and source.shape == (120, 100)


def test_ome_zarr_output_has_pyramid_axes_scale_and_a_window_over_its_classes(tmp_path):
    from ome_zarr_models.v05.image import Image

    image = np.random.default_rng(4).integers(0, 256, (2100, 1300, 3), dtype=np.uint8)
    out = tmp_path / "labels.zarr"
    ts.segment(image, NET3, out, tile_size=256, progress=False)
    group = zarr.open_group(out, mode="r")
    Image.from_zarr(group)
    # An image, not an image-label: viewers take an image-label root for the label of an image
    # two folders up (napari-ome-zarr creates that group in the user's folder).
    assert "image-label" not in group.attrs["ome"] and group.attrs["tilesegment"]["label_values"] == 3
    assert group.attrs["ome"]["omero"]["channels"][0]["window"] == {"min": 0, "max": 2, "start": 0, "end": 2}
    ms = group.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    shapes = [group[d["path"]].shape for d in ms["datasets"]]
    assert shapes == [(2100, 1300), (1050, 650), (525, 325)]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]
    np.testing.assert_array_equal(group["1"][:], group["0"][::2, ::2])


def test_probability_pyramid_is_the_2x2_mean(tmp_path):
    image = np.random.default_rng(4).integers(0, 256, (1100, 300, 3), dtype=np.uint8)
    out = ts.segment(image, NET3, tmp_path / "p.zarr", tile_size=128, mode="probabilities", progress=False)
    level1 = zarr.open_array(tmp_path / "p.zarr" / "1", mode="r")[:]
    full = out[:].astype(np.float32)
    mean = (full[:, ::2, ::2] + full[:, 1::2, ::2] + full[:, ::2, 1::2] + full[:, 1::2, 1::2]) / 4
    assert level1.shape == (3, 550, 150)
    assert np.abs(level1 - np.rint(mean)).max() == 0


def test_output_opens_as_a_multiscale_image_with_the_ome_zarr_reader(tmp_path):
    ome_zarr = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    image = np.random.default_rng(6).integers(0, 256, (1500, 700, 3), dtype=np.uint8)
    out = tmp_path / "napari.zarr"
    ts.segment(image, NET3, out, tile_size=256, progress=False)
    nodes = list(ome_zarr.Reader(parse_url(str(out)))())
    shapes = [tuple(d.shape) for d in nodes[0].data]
    assert shapes == [(1500, 700), (750, 350)]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_input_in_both_ngff_versions(tmp_path, rgb, version):
    path = tmp_path / "in.zarr"
    fmt = 2 if version == "0.4" else 3
    group = zarr.open_group(path, mode="w", zarr_format=fmt)
    data = np.moveaxis(rgb, -1, 0)
    group.create_array("0", data=data, chunks=(3, 64, 64))
    group.create_array("1", data=np.ascontiguousarray(data[:, ::2, ::2]), chunks=(3, 64, 64))
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]
    datasets = [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1, 0.5 * 2**i, 0.5 * 2**i]}]} for i in range(2)]
    ms = {"axes": axes, "datasets": datasets}
    if version == "0.4":
        group.attrs["multiscales"] = [{"version": "0.4", **ms}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    source = _exact(path, NET3)
    assert source.format == "ome-zarr" and source.pixel_size == (0.5, 0.5)
    assert ts.open_image(path, level=1).shape == (150, 130)


def _pyramid_tiff(path, rgb, pixel_size=0.5):
    from tilesegment.demo import write_tiff_pyramid

    return write_tiff_pyramid(path, rgb, pixel_size)


def test_mpp_reads_the_matching_level_or_area_resamples(tmp_path):
    rgb = np.random.default_rng(7).integers(0, 256, (2400, 1800, 3), dtype=np.uint8)
    path = _pyramid_tiff(tmp_path / "pyr.tif", rgb)
    exact_level = ts.open_image(path, mpp=1.0)
    assert exact_level.shape == (1200, 900) and exact_level.pixel_size == pytest.approx((1.0, 1.0))
    resampled = ts.open_image(path, mpp=0.75)
    assert isinstance(resampled, ResampledSource) and resampled.shape == (1600, 1200)
    out = ts.segment(path, NET3, tmp_path / "o.zarr", mpp=1.5, tile_size=128, progress=False)
    assert out.shape == (800, 600)
    scale = zarr.open_group(tmp_path / "o.zarr").attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == pytest.approx([1.5, 1.5])
    with pytest.raises(ts.InputError, match="finer than"):
        ts.open_image(path, mpp=0.2)


def test_area_resampling_of_any_region_equals_the_whole_image(rgb):
    source = ResampledSource(ts.open_image(rgb), (1.7, 2.3), None)
    whole = source.read(0, source.shape[0], 0, source.shape[1])
    for y0, y1, x0, x1 in [(0, 10, 0, 10), (13, 77, 5, 90), (100, 176, 50, 113)]:
        np.testing.assert_array_equal(source.read(y0, y1, x0, x1), whole[y0:y1, x0:x1])
    mean = rgb[:17, :23].astype(np.float64).mean((0, 1))
    np.testing.assert_allclose(ResampledSource(ts.open_image(rgb), (17, 23), None).read(0, 1, 0, 1)[0, 0], mean, atol=0.5)


def _slide_with_glass(shape=(600, 500)):
    from tilesegment.he import synthetic_slide

    rgb, labels = synthetic_slide(shape, seed=3, tissue_fraction=0.3)
    return rgb, labels


@pytest.mark.parametrize("mode", ["labels", "probabilities"])
def test_tissue_mask_skips_glass_tiles_and_leaves_computed_pixels_unchanged(mode):
    rgb, _ = _slide_with_glass()
    full = ts.segment(rgb, NET3, tile_size=64, mode=mode, progress=False)
    job = ts.prepare(rgb, NET3, tile_size=64, mode=mode, tissue_mask="auto")
    masked, stats = job.run(progress=False)
    assert 0 < stats.skipped < job.plan.n_tiles
    for i in range(job.plan.n_tiles):
        tile = job.plan.tile(i)
        window = (..., slice(tile.origin[0], tile.origin[0] + tile.size[0]), slice(tile.origin[1], tile.origin[1] + tile.size[1]))
        if job.tissue[i]:
            np.testing.assert_array_equal(masked[window], full[window])
        elif mode == "labels":
            assert (masked[window] == 0).all()
        else:
            assert (masked[window][0] == 255).all() and (masked[window][1:] == 0).all()


def test_tissue_mask_from_array_and_file(tmp_path):
    rgb, _ = _slide_with_glass()
    mask = np.zeros((60, 50), bool)
    mask[:10, :10] = True
    job = ts.prepare(rgb, NET3, tile_size=64, tissue_mask=mask)
    assert job.tissue.sum() == job.plan.tiles_touching(mask, margin=0).sum() < job.plan.n_tiles
    tifffile.imwrite(tmp_path / "mask.tif", mask.astype(np.uint8) * 255)
    np.testing.assert_array_equal(ts.prepare(rgb, NET3, tile_size=64, tissue_mask=tmp_path / "mask.tif").tissue, job.tissue)
    with pytest.raises(ts.InputError, match="aspect"):
        ts.prepare(rgb, NET3, tile_size=64, tissue_mask=np.ones((10, 90), bool))


def test_real_svs_tissue_mask_computes_fewer_tiles_with_identical_pixels(shared_svs):
    full = ts.segment(shared_svs, NET3, tile_size=256, progress=False)
    job = ts.prepare(shared_svs, NET3, tile_size=256, tissue_mask="auto")
    masked, stats = job.run(progress=False)
    assert stats.skipped >= 0.15 * job.plan.n_tiles
    computed = np.zeros(full.shape, bool)
    for i in np.flatnonzero(job.tissue):
        t = job.plan.tile(int(i))
        computed[t.origin[0] : t.origin[0] + t.size[0], t.origin[1] : t.origin[1] + t.size[1]] = True
    np.testing.assert_array_equal(masked[computed], full[computed])


def test_unknown_axes_and_bad_levels_are_input_errors(tmp_path, rgb):
    with pytest.raises(ts.InputError, match="non-spatial axes"):
        ts.open_image(np.zeros((2, 5, 40, 40), np.uint8), axes="QCYX")
    with pytest.raises(ts.InputError, match="level 3 is out of range"):
        ts.open_image(rgb, level=3)
    path = _pyramid_tiff(tmp_path / "p.tif", rgb)
    with pytest.raises(ts.InputError, match="level 5 is out of range.*1 level"):
        ts.open_image(path, level=5)
    with pytest.raises(ts.InputError, match="channels \\[3\\] do not exist"):
        ts.open_image(rgb, channels=[3])


def test_a_missing_protocol_package_names_the_package_that_provides_it():
    import importlib.util

    from tilesegment.io.remote import filesystem

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ts.UsageError, match=r"needs gcsfs: pip install gcsfs$"):
        filesystem("gs://bucket/slide.svs")  # the remote extra has no gcsfs: no hint at it


def _files(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_napari_ome_zarr_opens_an_output_and_its_objects_and_writes_nothing(tmp_path):
    """napari-ome-zarr's reader (what `napari out.zarr` runs) on a segment output and its objects."""
    reader = pytest.importorskip("napari_ome_zarr._reader")
    folder = tmp_path / "project" / "slides"
    folder.mkdir(parents=True)
    out = folder / "slide.zarr"
    image = np.random.default_rng(4).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    ts.segment(image, NET3, out, tile_size=64, progress=False)
    ts.label_objects(out, classes=[1], progress=False)
    before = _files(tmp_path)
    layers = reader.napari_get_reader(str(out))()
    assert _files(tmp_path) == before  # nothing created above the output, nothing changed in it
    kinds = [(kind, meta.get("name"), np.asarray(data[0]).shape) for data, meta, kind in layers]
    assert ("image", kinds[0][1], (300, 200)) == kinds[0]  # the class map
    assert [k[0] for k in kinds] == ["image", "labels"] and kinds[1][2] == (300, 200)  # and the objects
    classes = layers[0][1]
    assert classes["contrast_limits"] == [0, 2]  # the window spans the classes, so they show
    np.testing.assert_array_equal(np.asarray(layers[0][0][0]), zarr.open_array(out / "0")[:])
    reader.napari_get_reader(str(out / "labels" / "objects"))()  # the objects alone open the slide too
    assert _files(tmp_path) == before
