"""Chunk steps over label maps: chunked with a halo equals the whole map, on threads and on a cluster."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

import tilesegment as ts
from tilesegment.registry import steps as registry
from tilesegment.steps import chain, map_overlap
from tilesegment.tasks import task_runner

distributed = pytest.importorskip("distributed")


class Dilate:
    """The largest label within Chebyshev distance `halo` of each pixel (a grey dilation): exact
    when chunked with that halo, and wrong without it."""

    dtype = np.dtype(np.uint32)

    def __init__(self, halo: int) -> None:
        self.halo = halo
        self.name = f"dilate{halo}"

    def apply(self, block, core):
        return ndimage.maximum_filter(block, size=2 * self.halo + 1, mode="nearest")[core].astype(self.dtype)


def _whole(labels, halo):
    return ndimage.maximum_filter(labels, size=2 * halo + 1, mode="nearest")


@pytest.fixture(scope="module")
def client():
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=":0",
                            silence_logs=40) as client:
        yield client


@st.composite
def maps(draw):
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(1, 20 if ndim == 2 else 8)) for _ in range(ndim))
    chunks = tuple(draw(st.integers(1, n)) for n in shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labels = np.where(rng.random(shape) < 0.2, rng.integers(1, 50, shape), 0).astype(np.uint32)
    return labels, chunks, draw(st.integers(0, 3))


@settings(max_examples=60, deadline=None)
@given(maps(), st.sampled_from([1, 3]), st.booleans())
def test_chunked_step_with_its_halo_equals_the_whole_map_on_threads(case, workers, stored):
    labels, chunks, halo = case
    source = labels
    if stored:  # zarr in and out, the output in the chunks the step runs in
        source = zarr.create_array(zarr.storage.MemoryStore(), shape=labels.shape, chunks=chunks, dtype=labels.dtype)
        source[...] = labels
        dest = zarr.create_array(zarr.storage.MemoryStore(), shape=labels.shape, chunks=chunks, dtype=np.uint32)
    else:
        dest = np.zeros(labels.shape, np.uint32)
    seen = []

    class Count:
        def advance(self, n):
            seen.append(n)

    map_overlap(Dilate(halo), source, dest, chunks, runner=task_runner(workers=workers), reporter=Count())
    np.testing.assert_array_equal(np.asarray(dest[...]), _whole(labels, halo))
    assert sum(seen) == np.prod([-(-n // c) for n, c in zip(labels.shape, chunks)])  # every chunk once


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(maps())
def test_chunked_step_equals_the_whole_map_on_a_dask_client(client, case):
    labels, chunks, halo = case
    with tempfile.TemporaryDirectory() as folder:
        source = zarr.create_array(f"{folder}/in.zarr", shape=labels.shape, chunks=chunks, dtype=labels.dtype)
        source[...] = labels
        dest = zarr.create_array(f"{folder}/out.zarr", shape=labels.shape, chunks=chunks, dtype=np.uint32)
        map_overlap(Dilate(halo), source, dest, runner=task_runner(client))
        np.testing.assert_array_equal(dest[...], _whole(labels, halo))


def test_a_chain_of_steps_equals_them_one_after_the_other_on_the_whole_map():
    labels = np.where(np.random.default_rng(1).random((23, 31)) < 0.05, 7, 0).astype(np.uint32)
    labels[0, 0] = 9
    both = chain([Dilate(1), Dilate(2)])
    assert both.halo == 3 and both.name == "dilate1+dilate2"
    got = map_overlap(both, labels, np.zeros_like(labels), chunks=(4, 5))
    np.testing.assert_array_equal(got, _whole(_whole(labels, 1), 2))


def test_a_step_too_short_sighted_for_its_halo_shows_chunk_seams():
    """The check above has teeth: a step that looks farther than it declares differs at chunk borders."""
    labels = np.zeros((12, 12), np.uint32)
    labels[5, 5] = 3

    class Liar(Dilate):
        def apply(self, block, core):
            return ndimage.maximum_filter(block, size=5, mode="nearest")[core].astype(self.dtype)

    got = map_overlap(Liar(1), labels, np.zeros_like(labels), chunks=4)
    assert not np.array_equal(got, _whole(labels, 2))


def test_steps_by_name_and_mistakes_fail_with_one_clear_error():
    labels = np.arange(16, dtype=np.uint32).reshape(4, 4)
    registry.register("test-dilate", Dilate(1))
    try:
        got = map_overlap("test-dilate", labels, np.zeros_like(labels), chunks=2)
        np.testing.assert_array_equal(got, _whole(labels, 1))
    finally:
        registry.unregister("test-dilate")
    with pytest.raises(ts.UsageError, match="step 'test-dilate' is unknown"):
        map_overlap("test-dilate", labels, np.zeros_like(labels), chunks=2)
    with pytest.raises(ts.UsageError, match="not a ChunkStep"):
        map_overlap(object(), labels, np.zeros_like(labels), chunks=2)
    with pytest.raises(ts.UsageError, match="cannot write into its input"):
        map_overlap(Dilate(1), labels, labels, chunks=2)
    with pytest.raises(ts.UsageError, match="pass chunks="):
        map_overlap(Dilate(1), labels, np.zeros_like(labels))
    stored = zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 4), chunks=(2, 2), dtype=np.uint32)
    with pytest.raises(ts.UsageError, match="multiples of the output's stored chunks"):
        map_overlap(Dilate(1), labels, stored, chunks=3)

    class Whole(Dilate):  # returns the block, not its core
        def apply(self, block, core):
            return block

    with pytest.raises(ts.UsageError, match="must return the result for block\\[core\\] only"):
        map_overlap(Whole(1), labels, np.zeros_like(labels), chunks=2)


def _objects_map():
    rng = np.random.default_rng(4)
    return np.where(rng.random((40, 37)) < 0.3, rng.integers(1, 3, (40, 37)), 0).astype(np.uint8)


def test_label_objects_steps_run_over_the_numbered_objects_in_memory_and_in_zarr(tmp_path):
    labels = _objects_map()
    numbered = ts.label_objects(labels, chunks=8, progress=False)
    seen = []
    grown = ts.label_objects(labels, chunks=8, steps=[Dilate(2)], progress=lambda d, t: seen.append((d, t)))
    np.testing.assert_array_equal(grown.labels, _whole(numbered.labels, 2))
    assert seen[-1] == (3 * 25, 3 * 25) and grown.steps == ("dilate2",)  # labelled, written, stepped
    # the table describes the labels as the step left them: objects it swallowed are gone
    final = grown.labels
    present = np.unique(final[final > 0])
    assert list(grown.table["id"]) == list(present) and len(present) < len(numbered)
    assert list(grown.table["area"]) == [int((final == i).sum()) for i in present]
    assert (grown.table["class"].to_numpy() == numbered.table.set_index("id").loc[present, "class"].to_numpy()).all()
    import gzip, json  # noqa: E401

    features = json.loads(gzip.decompress(grown.to_geojson(tmp_path / "o.geojson.gz").read_bytes()))["features"]
    assert sorted(f["properties"]["measurements"]["Object ID"] for f in features) == list(present)
    registry.register("test-dilate", Dilate(1))
    try:
        stored = ts.label_objects(labels, tmp_path / "o.zarr", chunks=8, steps=["test-dilate", Dilate(1)],
                                  progress=False)
    finally:
        registry.unregister("test-dilate")
    np.testing.assert_array_equal(stored.labels[:], _whole(numbered.labels, 2))
    assert sorted(zarr.open_group(tmp_path / "o.zarr", mode="r").array_keys()) == ["0"]  # scratch gone


def test_label_objects_steps_on_a_dask_client_equal_a_local_run(client, tmp_path):
    labels = _objects_map()
    source = tmp_path / "map.zarr"
    zarr.create_array(source, data=labels, chunks=(8, 8))
    local = ts.label_objects(labels, chunks=8, steps=[Dilate(2)], progress=False)
    remote = ts.label_objects(source, tmp_path / "o.zarr", chunks=8, steps=[Dilate(2)], client=client,
                              progress=False)
    np.testing.assert_array_equal(remote.labels[:], local.labels)
    assert remote.table.equals(local.table)


def test_cached_blocks_read_what_the_array_holds_and_travel_without_their_cache():
    import pickle

    from tilesegment.steps import CachedBlocks

    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, (37, 29, 11)).astype(np.uint32)
    source = zarr.create_array(zarr.storage.MemoryStore(), shape=data.shape, chunks=(8, 5, 4), dtype=data.dtype)
    source[...] = data
    blocks = CachedBlocks(source)
    for _ in range(50):
        lo = [int(rng.integers(0, n)) for n in data.shape]
        outer = tuple(slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(lo, data.shape))
        np.testing.assert_array_equal(blocks[outer], data[outer])
    assert 0 < len(blocks._cache) <= blocks.capacity == 2 * 27
    copy = pickle.loads(pickle.dumps(blocks))
    assert len(copy._cache) == 0 and copy[(slice(0, 3),) * 3].tolist() == data[:3, :3, :3].tolist()
