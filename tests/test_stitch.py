import numpy as np
import pytest
import zarr

import tilesegment as ts
from tilesegment._kernels import crop_copy as _crop_copy, crop_labels as _crop_labels, crop_probabilities as _crop_probabilities


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(size=(4, 20, 22)).astype(np.float32)


def test_crop_kernels_match_numpy_reference(logits):
    cy, cx, h, w, dy, dx = 3, 5, 9, 11, 2, 1
    window = logits[:, cy : cy + h, cx : cx + w]
    dest = np.full((4, 14, 15), 7, np.float32)
    _crop_copy(logits, cy, cx, h, w, dest, dy, dx)
    np.testing.assert_array_equal(dest[:, dy : dy + h, dx : dx + w], window)
    assert (dest[:, :dy] == 7).all()

    labels = np.zeros((14, 15), np.uint8)
    _crop_labels(logits, cy, cx, h, w, labels, dy, dx)
    np.testing.assert_array_equal(labels[dy : dy + h, dx : dx + w], window.argmax(0))

    probs = np.zeros((4, 14, 15), np.uint8)
    _crop_probabilities(logits, cy, cx, h, w, probs, dy, dx)
    e = np.exp(window - window.max(0))
    np.testing.assert_array_equal(probs[:, dy : dy + h, dx : dx + w], np.floor(e / e.sum(0) * 255 + 0.5))


def test_single_class_outputs_threshold_and_sigmoid(logits):
    one = logits[:1]
    labels = np.zeros((20, 22), np.uint8)
    _crop_labels(one, 0, 0, 20, 22, labels, 0, 0)
    np.testing.assert_array_equal(labels, one[0] > 0)
    probs = np.zeros((1, 20, 22), np.uint8)
    _crop_probabilities(one, 0, 0, 20, 22, probs, 0, 0)
    np.testing.assert_array_equal(probs[0], np.floor(255 / (1 + np.exp(-one[0].astype(np.float64))) + 0.5))


def _identity_tiler(shape=(70, 50), tile=16, chunk=None):
    image = np.random.default_rng(1).random(shape).astype(np.float32)
    return ts.Tiler(image, ts.Geometry(halo=3, step=4), tile_size=tile, chunk_size=chunk), image


def test_stitched_tiles_land_in_place_whatever_order_they_arrive():
    tiler, image = _identity_tiler()
    order = np.random.default_rng(0).permutation(len(tiler.plan))
    with ts.Stitcher(tiler.plan, mode="logits") as stitcher:
        for batch in tiler.batches(3, tiles=order):
            stitcher.add(batch, batch.data)
    np.testing.assert_array_equal(stitcher.result[0], image)


class CountingStore(zarr.storage.MemoryStore):
    """Counts every write per key."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.writes = {}

    async def set(self, key, value):
        self.writes[key] = self.writes.get(key, 0) + 1
        await super().set(key, value)


@pytest.mark.parametrize("tile,chunk", [(16, 16), (16, 32), (32, 8)])
def test_every_zarr_chunk_is_written_exactly_once(tile, chunk):
    tiler, image = _identity_tiler((70, 50), tile, chunk)
    store = CountingStore()
    with ts.Stitcher(tiler.plan, store, mode="logits") as stitcher:
        for batch in tiler.batches(2):
            stitcher.add(batch, batch.data)
    chunk_writes = {k: n for k, n in store.writes.items() if "/c/" in k}
    expected_chunks = -(-70 // chunk) * -(-50 // chunk)
    assert len(chunk_writes) == expected_chunks
    assert set(chunk_writes.values()) == {1}
    np.testing.assert_array_equal(stitcher.result[0], image)


def test_adding_a_tile_twice_or_forgetting_one_is_an_error():
    tiler, _ = _identity_tiler()
    stitcher = ts.Stitcher(tiler.plan, mode="logits")
    batch = tiler.batch([0, 1])
    stitcher.add(batch, batch.data)
    with pytest.raises(ts.UsageError, match="added twice"):
        stitcher.add(tiler.batch([1]), batch.data[:1])
    with pytest.raises(ts.TileSegmentError, match="never added"):
        stitcher.close()


def test_output_smaller_than_tile_is_refused_with_the_sizes():
    tiler, _ = _identity_tiler()
    stitcher = ts.Stitcher(tiler.plan)
    with pytest.raises(ts.UsageError, match="smaller than crop"):
        stitcher.add([0], np.zeros((1, 2, 10, 10), np.float32))


def test_bfloat16_outputs_and_single_class_label_values(tmp_path):
    import torch

    tiler, _ = _identity_tiler()
    with ts.Stitcher(tiler.plan, tmp_path / "o.zarr", mode="labels") as stitcher:
        for batch in tiler.batches(4):
            stitcher.add(batch, torch.from_numpy(batch.data - 0.5).to(torch.bfloat16))
    attrs = zarr.open_group(tmp_path / "o.zarr").attrs
    assert attrs["tilesegment"]["label_values"] == 2  # one class: logit > 0, values 0 and 1
    assert attrs["ome"]["omero"]["channels"][0]["window"]["end"] == 1


def test_stitcher_takes_an_output_value_or_an_injected_sink(tmp_path):
    from tilesegment.io.output import Output
    from tilesegment.io.sinks import MemorySink

    image = np.random.default_rng(3).random((40, 30)).astype(np.float32)
    tiler = ts.Tiler(image, ts.Geometry(halo=2, step=4), tile_size=16)

    def fill(stitcher):
        with stitcher:
            for batch in tiler.batches(2):
                stitcher.add(batch, batch.data)  # identity "network", as for same padding
        return stitcher.result

    expected = fill(ts.Stitcher(tiler.plan, mode="logits"))
    written = fill(ts.Stitcher(tiler.plan, Output(tmp_path / "o.zarr", ngff="0.4"), mode="logits"))
    assert zarr.open_group(tmp_path / "o.zarr", mode="r").metadata.zarr_format == 2
    np.testing.assert_array_equal(written[:], expected)

    class Recording(MemorySink):  # any object with buffer/commit/close/abort will do
        committed: list = []

        def commit(self, region, buffer, block=None, failed=None):
            self.committed.append(block)

    sink = Recording((1, 40, 30), np.float32)
    np.testing.assert_array_equal(fill(ts.Stitcher(tiler.plan, mode="logits", sink=sink)), expected)
    assert sorted(sink.committed) == list(range(tiler.plan.n_blocks))
    with pytest.raises(ts.OutputExistsError):
        ts.Stitcher(tiler.plan, Output(tmp_path / "o.zarr"))
    with pytest.raises(ts.UsageError, match="exclude each other"):
        Output(tmp_path / "p.zarr", overwrite=True, resume=True)
    with pytest.raises(ts.UsageError, match="no unfinished run to resume"):  # complete: nothing to resume
        Output(tmp_path / "o.zarr", resume=True).check()


def test_reduced_labels_need_the_class_count_their_label_metadata_names(tmp_path):
    tiler, _ = _identity_tiler()
    batch = tiler.batch([0, 1])
    reduced = np.zeros((2, 1, *tiler.plan.tile_size), np.uint8)
    for first in ("add", "fill"):
        stitcher = ts.Stitcher(tiler.plan, tmp_path / f"{first}.zarr", mode="labels")
        with pytest.raises(ts.UsageError, match=r"num_classes=K"):
            stitcher.add(batch, reduced, reduced=True) if first == "add" else stitcher.fill([0])
    with ts.Stitcher(tiler.plan, tmp_path / "o.zarr", mode="labels", num_classes=5) as stitcher:
        stitcher.add(batch, reduced, reduced=True)
        stitcher.fill(np.arange(2, tiler.plan.n_tiles))
    attrs = zarr.open_group(tmp_path / "o.zarr").attrs
    assert attrs["tilesegment"]["label_values"] == 5
    assert attrs["ome"]["omero"]["channels"][0]["window"]["end"] == 4
    with ts.Stitcher(tiler.plan, mode="labels") as in_memory:  # no metadata: no class count needed
        in_memory.add(batch, reduced, reduced=True)
        in_memory.fill(np.arange(2, tiler.plan.n_tiles))
