"""The loader decodes each stored chunk once, and its inputs equal per-tile reads."""

import numpy as np
import pytest
import tifffile
import torch
import zarr
from hypothesis import HealthCheck, given, settings, strategies as st

import tilesegment as ts
from tilesegment.executor import Executor
from tilesegment.io.chunks import ChunkCache
from tilesegment.io.mirror import PADDING_MODES, gather_raw, pad_indices
from tilesegment.testing import assert_exact


class CountingSource:
    """An ImageSource that counts how often each chunk is decoded."""

    def __init__(self, source):
        self._source = source
        self.calls: dict = {}

    def __getattr__(self, name):
        return getattr(self._source, name)

    def read_chunk(self, cy, cx):
        self.calls[(cy, cx)] = self.calls.get((cy, cx), 0) + 1
        return self._source.read_chunk(cy, cx)


def chunked(image: np.ndarray, chunks) -> ts.ImageSource:
    array = zarr.create_array(store={}, shape=image.shape, chunks=(*chunks, image.shape[2]), dtype=image.dtype)
    array[:] = image
    return ts.open_image(array, axes="YXC")


def touched_chunks(tiler, tiles, chunk) -> set:
    """Chunks that the padded inputs of `tiles` overlap, worked out from first principles."""
    touched = set()
    for index in tiles:
        (oy, ox), (hy, hx) = tiler.plan.origins[index], tiler.geometry.halo
        iy = pad_indices(int(oy) - hy, tiler.plan.input_size[0], tiler.plan.shape[0], tiler.padding)
        ix = pad_indices(int(ox) - hx, tiler.plan.input_size[1], tiler.plan.shape[1], tiler.padding)
        iy, ix = iy[iy >= 0], ix[ix >= 0]
        if iy.size == 0 or ix.size == 0:  # all constant padding: one pixel is still read
            iy, ix = np.array([0]), np.array([0])
        rows = range(iy.min() // chunk[0], iy.max() // chunk[0] + 1)
        cols = range(ix.min() // chunk[1], ix.max() // chunk[1] + 1)
        touched |= {(r, c) for r in rows for c in cols}
    return touched


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ny=st.integers(1, 90), nx=st.integers(1, 90),
    chunk=st.tuples(st.integers(3, 40), st.integers(3, 40)),
    halo=st.integers(0, 30), step=st.sampled_from([1, 4, 8]), tiles_per=st.integers(1, 4),
    padding=st.sampled_from(PADDING_MODES), batch=st.integers(1, 3), workers=st.integers(0, 2),
    subset=st.integers(0, 2**16), normalize=st.booleans(), channels_last=st.booleans(),
)
def test_cached_batches_equal_per_tile_reads_and_decode_each_needed_chunk_once(
    ny, nx, chunk, halo, step, tiles_per, padding, batch, workers, subset, normalize, channels_last
):
    rng = np.random.default_rng(ny * 1000 + nx)
    image = rng.integers(0, 256, (ny, nx, 2), dtype=np.uint8)
    source = CountingSource(chunked(image, chunk))
    tiler = ts.Tiler(source, ts.Geometry(halo=halo, step=step), tile_size=step * tiles_per, padding=padding)
    # Any subset of tiles in plan order, like a resumed or tissue-masked run.
    keep = np.random.default_rng(subset).random(tiler.plan.n_tiles) < 0.7
    tiles = np.flatnonzero(keep) if keep.any() else np.arange(tiler.plan.n_tiles)

    seen = []
    for b in tiler.batches(batch, tiles=tiles, workers=workers, normalize=normalize,
                           channels_last=channels_last):
        assert b.data.transpose(0, 2, 3, 1).flags.c_contiguous or not channels_last
        for k, index in enumerate(b.indices):
            expected = tiler.read(int(index), normalize=normalize)
            np.testing.assert_array_equal(b.data[k], expected)
            seen.append(int(index))
    assert seen == tiles.tolist()
    # Each chunk some input needs is decoded exactly once; chunks only skipped tiles need, never.
    assert source.calls == {key: 1 for key in touched_chunks(tiler, tiles, chunk)}
    assert tiler.last_cache._bytes == 0 and not tiler.last_cache._chunks  # all released


def test_a_byte_budget_bounds_the_cache_and_costs_only_extra_decoding():
    image = np.random.default_rng(1).integers(0, 256, (200, 160, 3), dtype=np.uint8)
    source = CountingSource(chunked(image, (16, 16)))
    chunk_bytes = 16 * 16 * 3
    tiler = ts.Tiler(source, ts.Geometry(halo=12, step=8), tile_size=32, cache_bytes=6 * chunk_bytes)
    for b in tiler.batches(2, workers=2):
        for k, index in enumerate(b.indices):
            np.testing.assert_array_equal(b.data[k], tiler.read(int(index)))
    cache = tiler.last_cache
    assert cache.peak_bytes <= 7 * chunk_bytes  # the budget plus the chunk being added
    assert cache.decoded > len(source.calls)  # some chunks had to be decoded again


def test_chunk_use_counts_match_a_direct_count():
    source = chunked(np.zeros((50, 70, 1), np.uint8), (8, 16))
    spans = np.array([[0, 50, 0, 70], [5, 9, 15, 17], [40, 41, 69, 70]])
    cache = ChunkCache(source, spans)
    expected = np.zeros(cache.grid, int)
    for y0, y1, x0, x1 in spans:
        expected[y0 // 8 : -(-y1 // 8), x0 // 16 : -(-x1 // 16)] += 1
    np.testing.assert_array_equal(cache._uses, expected)


@pytest.mark.parametrize("compression, shape", [("zlib", (300, 200, 3)), ("zlib", (300, 200)),
                                                ("jpeg", (300, 200, 3))])
def test_tiff_tiles_decoded_from_the_file_equal_tifffile_reads(tmp_path, compression, shape):
    image = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, image, tile=(64, 48), compression=compression,
                     photometric="rgb" if len(shape) == 3 else "minisblack")
    source = ts.open_image(path)
    assert source.backend.decode_chunk is not None and source.chunk_shape == (64, 48)
    for cy in range(-(-shape[0] // 64)):
        for cx in range(-(-shape[1] // 48)):
            y0, x0 = cy * 64, cx * 48
            expected = source.read(y0, min(y0 + 64, shape[0]), x0, min(x0 + 48, shape[1]))
            np.testing.assert_array_equal(source.read_chunk(cy, cx), expected)
    source.close()


def test_tiff_channel_order_applies_to_decoded_tiles(tmp_path):
    image = np.random.default_rng(3).integers(0, 256, (70, 50, 3), dtype=np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, image, tile=(32, 32), photometric="rgb", compression="zlib")
    source = ts.open_image(path, channels=[2, 0])
    np.testing.assert_array_equal(source.read_chunk(1, 1), image[32:64, 32:50][..., [2, 0]])


def test_real_slide_tiles_decode_like_the_zarr_store(shared_svs):
    source = ts.open_image(shared_svs)
    assert source.backend.decode_chunk is not None
    cy, cx = source.chunk_shape
    ny, nx = source.shape
    last = ((ny - 1) // cy, (nx - 1) // cx)
    for key in [(0, 0), (2, 3), last]:
        y0, x0 = key[0] * cy, key[1] * cx
        expected = source.read(y0, min(y0 + cy, ny), x0, min(x0 + cx, nx))
        np.testing.assert_array_equal(source.read_chunk(*key), expected)
    source.close()


@pytest.mark.parametrize("dtype", [np.uint8, np.bool_, np.float32])
def test_gather_raw_mirrors_like_numpy_pad_in_the_source_dtype(dtype):
    image = (np.random.default_rng(4).random((9, 7, 2)) * 200).astype(dtype)
    out = np.empty((2, 30, 12), np.uint8 if dtype == np.bool_ else dtype)
    gather_raw(image, pad_indices(-10, 30, 9), pad_indices(-3, 12, 7), out)
    expected = np.pad(image, ((10, 11), (3, 2), (0, 0)), mode="reflect").transpose(2, 0, 1)
    np.testing.assert_array_equal(out, expected)


def test_unnormalized_batches_normalized_by_the_executor_give_the_same_output():
    # The GPU path (uint8 upload, affine on the device) run on CPU against the float32 path.
    torch.manual_seed(0)
    net = ts.UNet(3, 2, base_channels=4, depth=2).eval()
    image = np.random.default_rng(5).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    tiler = ts.Tiler(image, net.geometry, tile_size=32, normalization=((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))
    plain = Executor(net, "cpu")
    raw = Executor(net, "cpu", input_affine=(tiler.scale, tiler.offset))
    for a, b in zip(tiler.batches(3), tiler.batches(3, normalize=False)):
        assert b.data.dtype == np.uint8
        assert_exact(raw(b.data).numpy(), plain(a.data).numpy())


@pytest.mark.parametrize("dtype", [np.bool_, np.float16, np.uint16, np.float64])
def test_cached_batches_handle_every_source_dtype(dtype):
    image = (np.random.default_rng(6).random((50, 40, 1)) * 3).astype(dtype)
    tiler = ts.Tiler(chunked(image, (16, 16)), ts.Geometry(halo=3, step=4), tile_size=16)
    for normalize in (True, False):
        for b in tiler.batches(2, normalize=normalize, channels_last=True):
            assert b.data.dtype == (np.float32 if normalize else tiler.input_dtype)
            for k, index in enumerate(b.indices):
                np.testing.assert_array_equal(b.data[k], tiler.read(int(index), normalize=normalize))


def test_a_sharded_zarr_is_decoded_shard_by_shard():
    image = np.random.default_rng(7).integers(0, 256, (100, 90, 1), dtype=np.uint8)
    array = zarr.create_array(store={}, shape=image.shape, chunks=(10, 10, 1), shards=(50, 30, 1), dtype=np.uint8)
    array[:] = image
    tiler = ts.Tiler(ts.open_image(array, axes="YXC"), ts.Geometry(halo=3, step=4), tile_size=16)
    assert tiler.source.chunk_shape == (50, 30)
    for b in tiler.batches(3):
        for k, index in enumerate(b.indices):
            np.testing.assert_array_equal(b.data[k], tiler.read(int(index)))
    assert tiler.last_cache.decoded == 2 * 3  # each shard once


def test_tiles_a_tiff_leaves_out_read_as_its_fill_value(tmp_path):
    # Philips slides omit background tiles (byte count 0); tifffile's store fills them.
    image = (np.arange(256 * 256) % 251).astype(np.uint8).reshape(256, 256)
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, image, tile=(128, 128))
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        counts, offsets = tags["TileByteCounts"], tags["TileOffsets"]
        width = {3: 2, 4: 4, 16: 8}  # SHORT, LONG, LONG8
        spots = [(tag.valueoffset + width[int(tag.dtype)], width[int(tag.dtype)]) for tag in (counts, offsets)]
    with open(path, "r+b") as f:
        for spot, n in spots:  # entry 1 of both: tile (0, 1) is left out
            f.seek(spot)
            f.write(b"\0" * n)
    source = ts.open_image(path)
    assert source.backend.decode_chunk is not None
    np.testing.assert_array_equal(source.read_chunk(0, 1), source.read(0, 128, 128, 256))
    assert not source.read_chunk(0, 1).any() and source.read_chunk(0, 0).any()
    tiler = ts.Tiler(path, ts.Geometry(halo=8, step=16), tile_size=64)
    for b in tiler.batches(4, workers=1):
        assert len(b.failed) == 0
        for k, index in enumerate(b.indices):
            np.testing.assert_array_equal(b.data[k], tiler.read(int(index)))


def test_a_run_stopped_early_leaves_no_decoded_chunks():
    image = np.random.default_rng(8).integers(0, 256, (200, 200, 1), dtype=np.uint8)
    tiler = ts.Tiler(chunked(image, (16, 16)), ts.Geometry(halo=6, step=8), tile_size=32)
    batches = tiler.batches(2, workers=2)
    next(batches)
    assert tiler.last_cache._chunks  # chunks kept for the tiles still to come
    batches.close()
    assert not tiler.last_cache._chunks and tiler.last_cache._bytes == 0


def test_byte_count_stays_exact_when_readers_race_with_eviction_and_release(monkeypatch):
    """Eviction and release may drop a chunk while its decoder is still publishing it:
    the cache must subtract exactly what it counted, or its bound drifts."""
    import threading
    import time
    from concurrent.futures import Future, ThreadPoolExecutor

    import tilesegment.io.chunks as chunks

    class Source:
        chunk_shape, shape, channels, dtype = (8, 8), (256, 256), 1, np.dtype(np.float32)

        def read_chunk(self, i, j):
            time.sleep(0.0002)
            return np.full((8, 8, 1), i * 100 + j, np.float32)

    class SlowFuture(Future):  # widens the window between decoding and publishing
        def set_result(self, result):
            super().set_result(result)
            time.sleep(0.001)

    monkeypatch.setattr(chunks, "Future", SlowFuture)
    rng = np.random.default_rng(0)
    for _ in range(5):
        starts = rng.integers(0, 230, (200, 2))
        spans = np.stack([starts[:, 0], starts[:, 0] + 24, starts[:, 1], starts[:, 1] + 24], 1)
        cache = chunks.ChunkCache(Source(), spans, max_bytes=20 * 256)
        held_over = threading.Event()

        def read(k):
            s = spans[k]
            try:
                out = cache.read((s[0], s[2]), (s[1], s[3]))
                expected = (np.arange(s[0], s[1])[:, None] // 8 * 100 + np.arange(s[2], s[3])[None] // 8)
                assert (out[..., 0] == expected).all()
            finally:
                cache.release((s[0], s[2]), (s[1], s[3]))
                if cache._bytes < 0:
                    held_over.set()

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(read, range(len(spans))))
        assert cache._bytes == 0 and not cache._chunks and not held_over.is_set()
