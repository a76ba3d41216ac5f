"""Remote slides and outputs through fsspec, against a local S3 server (moto, 127.0.0.1)."""

import os

import numpy as np
import pytest
import tifffile
import torch
import zarr

import tilesegment as ts
from tilesegment.cli import main
from tilesegment.io.manifest import Manifest

from conftest import SHARED_SVS

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "slides"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with credentials and endpoint in the environment."""
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # instances remember their endpoint
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs, endpoint
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _net():
    torch.manual_seed(0)
    return ts.UNet(3, 3, base_channels=2, depth=1).eval()  # small: the test is about I/O


@pytest.fixture(scope="module")
def svs_on_s3(s3):
    if not SHARED_SVS.exists():
        pytest.skip("../shared/data/small_HE.svs is not available")
    fs, _ = s3
    fs.put(str(SHARED_SVS), f"{BUCKET}/small_HE.svs")
    return f"s3://{BUCKET}/small_HE.svs"


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    if not SHARED_SVS.exists():
        pytest.skip("../shared/data/small_HE.svs is not available")
    out = tmp_path_factory.mktemp("local") / "small_HE.zarr"
    ts.segment(SHARED_SVS, _net(), out, tile_size=1024, progress=False)
    return zarr.open_group(out, mode="r")


def _assert_same_image(remote, local):
    assert dict(remote.attrs["ome"]) == dict(local.attrs["ome"])
    for ds in local.attrs["ome"]["multiscales"][0]["datasets"]:
        np.testing.assert_array_equal(remote[ds["path"]][:], local[ds["path"]][:])


def test_svs_from_s3_into_s3_equals_the_local_run(s3, svs_on_s3, local_reference):
    fs, _ = s3
    out = f"s3://{BUCKET}/run/small_HE.zarr"
    result = ts.segment(svs_on_s3, _net(), out, tile_size=1024, progress=False)
    assert result.shape == (2967, 2220)
    remote = zarr.open_group(out, mode="r")
    _assert_same_image(remote, local_reference)
    assert remote.attrs["tilesegment"]["complete"] and remote.attrs["tilesegment"]["input"]["name"] == "small_HE.svs"
    assert not fs.exists(f"{BUCKET}/run/small_HE.zarr/.tilesegment")  # manifest removed when done
    with pytest.raises(ts.OutputExistsError, match="already holds a zarr group"):
        ts.prepare(svs_on_s3, _net(), out)


def test_interrupted_s3_run_resumes_on_s3_to_the_identical_output(s3, svs_on_s3, local_reference, tmp_path,
                                                                   monkeypatch, capsys):
    model = ts.save_model(_net(), tmp_path / "net.pt")
    out = f"s3://{BUCKET}/killed/small_HE.zarr"
    args = ["segment", svs_on_s3, out, "--model", str(model), "--tile-size", "1024",
            "--chunk-size", "1024", "--quiet"]
    calls = {"n": 0}
    original_add = ts.Stitcher.add

    def interrupting_add(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt  # as Ctrl-C after 4 of 9 tiles
        return original_add(self, *a, **k)

    monkeypatch.setattr(ts.Stitcher, "add", interrupting_add)
    assert main(args) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(ts.Stitcher, "add", original_add)
    done = Manifest(out).done_blocks()
    assert 0 < len(done) < 9
    assert "ome" not in zarr.open_group(out, mode="r").attrs  # not mistakable for a finished image
    with pytest.raises(ts.OutputExistsError):
        ts.prepare(svs_on_s3, model, out, tile_size=1024, chunk_size=1024)
    job = ts.prepare(svs_on_s3, model, out, tile_size=1024, chunk_size=1024, resume=True)
    assert list(job.done_blocks) == list(done)
    computed = []
    original = job.tiler._read_tile
    job.tiler._read_tile = lambda index, *a: computed.append(index) or original(index, *a)
    job.run(progress=False)
    assert len(computed) == 9 - len(done)
    _assert_same_image(zarr.open_group(out, mode="r"), local_reference)
    assert not Manifest(out).exists


@pytest.fixture(scope="module")
def big_tiff_on_s3(s3, tmp_path_factory):
    """A 2048 x 2048 RGB TIFF of 64-px deflate tiles (noise, so it does not compress away)."""
    fs, _ = s3
    image = np.random.default_rng(0).integers(0, 256, (2048, 2048, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("tiff") / "big.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", compression="zlib")
    fs.put(str(path), f"{BUCKET}/big.tif")
    return f"s3://{BUCKET}/big.tif", path, image


def test_remote_tiff_is_read_lazily_in_ranges(big_tiff_on_s3):
    url, path, image = big_tiff_on_s3
    source = ts.open_image(url, storage_options={"block_size": 1 << 16})
    try:
        region = source.read(1000, 1128, 1500, 1628)
        handle = source.backend.resources[-1]
        fetched = handle.cache.total_requested_bytes
    finally:
        source.close()
    np.testing.assert_array_equal(region, image[1000:1128, 1500:1628])
    size = os.path.getsize(path)
    assert size > 12e6 and fetched < size / 20  # the tile index plus a few tiles, not the file


@pytest.fixture
def http_server(tmp_path):
    """A static file server on 127.0.0.1 that answers HTTP range requests (as web servers do)."""
    import functools
    import http.server
    import threading

    class RangeHandler(http.server.SimpleHTTPRequestHandler):
        def send_head(self):
            spec = self.headers.get("Range")
            path = self.translate_path(self.path)
            if spec is None or not os.path.isfile(path):
                return super().send_head()
            size = os.path.getsize(path)
            start, _, end = spec.removeprefix("bytes=").partition("-")
            start, end = int(start), min(int(end) if end else size - 1, size - 1)
            handle = open(path, "rb")
            handle.seek(start)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self.requested = end - start + 1
            return _Limited(handle, end - start + 1)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _Limited:
    """The `length` bytes from a file's current position, for copyfile."""

    def __init__(self, handle, length):
        self.handle, self.left = handle, length

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.handle.read(n)

    def close(self):
        self.handle.close()


def test_http_url_and_explicit_storage_options_read_the_same_pixels(s3, big_tiff_on_s3, http_server,
                                                                   monkeypatch):
    import shutil

    _, endpoint = s3
    url, path, image = big_tiff_on_s3
    folder, base = http_server
    shutil.copy(path, folder / "big.tif")
    via_http = ts.open_image(f"{base}/big.tif", storage_options={"block_size": 1 << 16})
    assert via_http.name == "big.tif" and via_http.shape == (2048, 2048)
    np.testing.assert_array_equal(via_http.read(0, 64, 1984, 2048), image[:64, 1984:])
    assert via_http.backend.resources[-1].cache.total_requested_bytes < os.path.getsize(path) / 20
    via_http.close()
    import s3fs

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        source = ts.open_image(url, storage_options={"endpoint_url": endpoint})
        np.testing.assert_array_equal(source.read(2000, 2048, 0, 10), image[2000:, :10])
        source.close()
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_remote_ome_zarr_is_an_input_in_both_ngff_versions(s3):
    image = np.random.default_rng(3).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    for ngff in ("0.5", "0.4"):
        out = f"s3://{BUCKET}/probabilities-{ngff}.zarr"
        written = ts.segment(image, _net(), out, tile_size=32, mode="probabilities", ngff=ngff, progress=False)
        source = ts.open_image(out)
        assert source.format == "ome-zarr" and source.axes == "CYX" and source.shape == (90, 70)
        np.testing.assert_array_equal(source.read(0, 90, 0, 70).transpose(2, 0, 1), written[:])


def test_missing_remote_input_and_missing_bucket_are_clear_errors(s3, capsys):
    with pytest.raises(ts.InputError, match="'s3://slides/nope.svs' does not exist"):
        ts.open_image(f"s3://{BUCKET}/nope.svs")
    assert main(["info", f"s3://{BUCKET}/nope.svs"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_failed_s3_run_with_nothing_done_leaves_nothing(s3, monkeypatch):
    fs, _ = s3

    def broken(self, *a, **k):
        raise RuntimeError("model exploded")

    monkeypatch.setattr(ts.Stitcher, "add", broken)
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(RuntimeError, match="exploded"):
        ts.segment(image, _net(), f"s3://{BUCKET}/failed.zarr", tile_size=32, progress=False)
    fs.invalidate_cache()
    assert not fs.exists(f"{BUCKET}/failed.zarr/zarr.json")
    assert fs.find(f"{BUCKET}/failed.zarr") == []


def test_batch_mode_refuses_a_url_output_folder(rgb_tiff, capsys):
    assert main(["segment", str(rgb_tiff), str(rgb_tiff), f"s3://{BUCKET}/many/", "--quiet"]) == 2
    assert "segment remote outputs one input at a time" in capsys.readouterr().err


def test_a_block_whose_put_fails_gets_no_marker_and_the_run_resumes_it(s3, monkeypatch):
    """A block's marker is PUT only after every PUT of its chunks returned."""
    import s3fs

    image = np.random.default_rng(4).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    out = f"s3://{BUCKET}/put-fails.zarr"
    original = s3fs.S3FileSystem._pipe_file

    async def failing(self, path, data, *args, **kwargs):
        if path.endswith("put-fails.zarr/0/c/0/1"):  # the only chunk of block 1 (blocks of 32 x 32)
            raise OSError("PUT failed: 503 Slow Down")
        return await original(self, path, data, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", failing)
    with pytest.raises(OSError, match="Slow Down"):
        ts.segment(image, _net(), out, tile_size=32, chunk_size=32, progress=False)
    monkeypatch.undo()
    done = list(Manifest(out).done_blocks())
    assert 0 in done and 1 not in done  # block 0 went in before; block 1's chunk never did
    fs, _ = s3
    fs.invalidate_cache()
    assert not fs.exists(f"{BUCKET}/put-fails.zarr/0/c/0/1")
    resumed = ts.segment(image, _net(), out, tile_size=32, chunk_size=32, resume=True, progress=False)
    np.testing.assert_array_equal(resumed[:], ts.segment(image, _net(), tile_size=32, progress=False))


def test_an_expired_lease_on_s3_is_taken_over_and_a_live_one_refuses(s3):
    import time

    from tilesegment.io.lock import Holder, OutputLock

    fs, _ = s3
    out = f"s3://{BUCKET}/leased.zarr"
    lock = f"{BUCKET}/.leased.zarr.lock"
    image = np.zeros((32, 32, 3), np.uint8)
    fs.pipe_file(lock, Holder("elsewhere", 4321, time.time() - 600, "theirs", "segment",
                              expires=time.time() + 60).to_bytes())
    with pytest.raises(ts.OutputBusyError, match="is being written by pid 4321 on host elsewhere since .*; wait for it"):
        ts.segment(image, _net(), out, tile_size=32, progress=False)
    fs.pipe_file(lock, Holder("elsewhere", 4321, time.time() - 600, "theirs", "segment",
                              expires=time.time() - 5).to_bytes())
    with pytest.warns(ts.StaleLockWarning, match=r"pid 4321 on host elsewhere .* but its lease expired \d+ s ago"):
        ts.segment(image, _net(), out, tile_size=32, progress=False)
    fs.invalidate_cache()
    assert not fs.exists(lock) and zarr.open_group(out, mode="r").attrs["tilesegment"]["complete"]
    # The lock is created only if none is there (If-None-Match), and its lease is pushed forward.
    with OutputLock(out) as held:
        with pytest.raises(ts.OutputBusyError, match=f"pid {os.getpid()}"):
            OutputLock(out).acquire()
        before = Holder.from_bytes(fs.cat_file(lock)).expires
        time.sleep(0.01)
        held.renew()
        assert Holder.from_bytes(fs.cat_file(lock)).expires > before
    assert not fs.exists(lock)
