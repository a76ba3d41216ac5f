"""The same plan on a dask.distributed LocalCluster (2 worker processes)."""

import numpy as np
import pytest
import tifffile
import torch
import zarr

import tilesegment as ts

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=40) as lc:
        with distributed.Client(lc) as client:
            yield client


@pytest.fixture
def slide(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (500, 430, 3), dtype=np.uint8)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    return path


@pytest.fixture
def net():
    torch.manual_seed(0)
    return ts.UNet(3, 3, base_channels=4, depth=2).eval()


@pytest.mark.parametrize("mode", ["labels", "probabilities"])
def test_distributed_output_equals_local_bit_for_bit(cluster, slide, net, tmp_path, mode):
    local = ts.segment(slide, net, tmp_path / "local.zarr", tile_size=64, chunk_size=128, mode=mode, progress=False)
    remote = ts.segment(slide, net, tmp_path / "remote.zarr", tile_size=64, chunk_size=128, mode=mode,
                        client=cluster, progress=False)
    for level in ("0", "1") if max(local.shape) > 1024 else ("0",):
        np.testing.assert_array_equal(zarr.open_array(tmp_path / "remote.zarr" / level)[:],
                                      zarr.open_array(tmp_path / "local.zarr" / level)[:])
    assert remote.shape == local.shape
    remote_attrs = zarr.open_group(tmp_path / "remote.zarr").attrs.asdict()
    local_attrs = zarr.open_group(tmp_path / "local.zarr").attrs.asdict()
    for attrs in (remote_attrs, local_attrs):
        attrs["ome"]["multiscales"][0].pop("name")  # the output's file name
    assert remote_attrs["ome"] == local_attrs["ome"] and remote_attrs["tilesegment"]["complete"]


def test_a_worker_killed_midway_is_survived(slide, net, tmp_path):
    import threading
    import time

    expected = ts.segment(slide, net, tile_size=64, progress=False)

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        geometry = net.geometry

        def forward(self, x):
            if x.device.type != "meta":
                time.sleep(0.05)
            return self.net(x)

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=50) as lc, distributed.Client(lc) as client:
        import os
        import signal

        pid = next(iter(client.run(os.getpid).values()))
        killed = []

        def kill_one():  # like a node going away, once blocks are being written
            manifest = tmp_path / "o.zarr" / ".tilesegment" / "done"
            while not (manifest.is_dir() and len(list(manifest.iterdir())) >= 3):
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        killer = threading.Thread(target=kill_one, daemon=True)
        killer.start()
        out = ts.segment(slide, Slow(), tmp_path / "o.zarr", tile_size=64, chunk_size=64, client=client,
                         progress=False)
        killer.join(timeout=5)
        assert killed and pid not in client.run(os.getpid).values()
    np.testing.assert_array_equal(out[:], expected)


def test_cli_scheduler_local_runs_on_a_local_cluster(slide, net, tmp_path, capsys):
    from tilesegment.cli import main

    model = ts.save_model(net, tmp_path / "m.pt")
    code = main(["segment", str(slide), str(tmp_path / "o.zarr"), "--model", str(model), "--tile-size", "64",
                 "--scheduler", "local:2"])
    assert code == 0, capsys.readouterr().err
    expected = ts.segment(slide, net, tile_size=64, progress=False)
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "o.zarr" / "0")[:], expected)


def test_distributed_objects_equal_local_ones(cluster, slide, tmp_path):
    """label_objects on the cluster: chunk tasks plus a merge on the client, equal to a local run."""
    from conftest import small_unet

    seg = tmp_path / "seg.zarr"
    ts.segment(slide, small_unet(), seg, tile_size=64, chunk_size=64, progress=False)
    local = ts.label_objects(seg, tmp_path / "local.zarr", chunks=64, progress=False)
    remote = ts.label_objects(seg, tmp_path / "remote.zarr", chunks=64, progress=False, client=cluster)
    assert len(local) > 10
    np.testing.assert_array_equal(remote.labels[:], local.labels[:])
    assert remote.table.equals(local.table)
    with pytest.raises(ts.UsageError, match="zarr path"):
        ts.label_objects(np.zeros((4, 4), np.uint8), client=cluster, progress=False)


def test_a_cancelled_cluster_run_keeps_its_blocks_and_resumes_to_the_local_result(cluster, slide, net, tmp_path):
    from tilesegment.io.manifest import Manifest

    out = tmp_path / "o.zarr"
    seen = []
    with pytest.raises(ts.Cancelled, match="finished blocks are kept"):
        ts.segment(slide, net, out, tile_size=64, chunk_size=64, client=cluster,
                   progress=lambda done, total: seen.append(done) or done == 0)  # stop after the first group
    assert len(seen) >= 2 and 0 < len(Manifest(out).done_blocks()) < 56
    resumed = ts.segment(slide, net, out, tile_size=64, chunk_size=64, resume=True, client=cluster, progress=False)
    np.testing.assert_array_equal(resumed[:], ts.segment(slide, net, tile_size=64, chunk_size=64, progress=False))


def test_the_gpu_shaped_path_is_the_same_locally_and_on_a_cluster(slide, net, tmp_path, monkeypatch):
    """uint8 batches normalized inside the executor, reduced there: what a GPU run does, on the CPU.
    A local run and a cluster run take it through the same runner and agree bit for bit."""
    from dataclasses import replace

    from tilesegment.executor import Executor

    seen = []
    call = Executor.__call__
    monkeypatch.setattr(Executor, "__call__", lambda self, data: seen.append((data.dtype, self.takes_raw))
                        or call(self, data))

    def gpu_shaped(out):
        job = ts.prepare(slide, net, out, tile_size=128, chunk_size=128, mode="probabilities")
        return replace(job, compute=replace(job.compute, raw_inputs=True, reduce_on_device=True))

    with gpu_shaped(tmp_path / "local.zarr") as job:
        job.run(progress=False)
    assert seen and set(seen) == {(np.dtype(np.uint8), True)}
    seen.clear()
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        with gpu_shaped(tmp_path / "cluster.zarr") as job:
            job.run(progress=False, client=client)
    assert seen and set(seen) == {(np.dtype(np.uint8), True)}  # the workers took the same path
    local = zarr.open_array(tmp_path / "local.zarr" / "0")[:]
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "cluster.zarr" / "0")[:], local)
    host = ts.segment(slide, net, tile_size=128, mode="probabilities", progress=False)  # float32 from the host
    assert np.abs(local.astype(int) - host).max() <= 1  # normalization order: one uint8 step at most


@pytest.fixture
def thread_cluster():
    """One in-process worker: patches of this process apply to it."""
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        yield client


def test_auto_precision_tile_and_batch_are_resolved_for_the_workers_devices(thread_cluster, slide, net, tmp_path,
                                                                             monkeypatch):
    """A CPU client planning for GPU workers: the record and the executors get what the workers
    mean by "auto" (bf16, a batch that fits their memory), not the client's fp32 and batch 1."""
    from tilesegment import distributed as cluster_run
    from tilesegment.options import DeviceFacts

    with ts.prepare(slide, net, tmp_path / "cpu.zarr", client=thread_cluster) as job:
        assert (job.compute.precision, job.record["precision"], job.batch_size) == ("fp32", "fp32", 1)
    gpu = DeviceFacts("cuda:0", "bf16", plan_budget=40 << 30, limit_budget=50 << 30)
    monkeypatch.setattr(cluster_run, "_own_device_facts", lambda budget: gpu)
    with ts.prepare(slide, net, tmp_path / "gpu.zarr", client=thread_cluster) as job:
        assert job.compute.precision == job.record["precision"] == "bf16"
        assert job.batch_size > 1 and job.compute.devices == ("cuda:0",)
        assert job.spec().compute.precision == "bf16"  # what every worker's executor gets


def test_workers_that_declare_a_gpu_but_see_none_are_refused_in_one_line(slide, net, tmp_path):
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0",
                            resources={"GPU": 1}) as client:
        with pytest.raises(ts.UsageError, match="1 of 1 dask workers that declare a GPU resource see no CUDA"):
            ts.segment(slide, net, tmp_path / "o.zarr", client=client, progress=False)
    assert not (tmp_path / "o.zarr").exists()


def test_auto_meaning_different_precisions_on_different_devices_is_refused():
    from tilesegment.options import DeviceFacts

    facts = [DeviceFacts("cuda:0", "bf16", 2 << 30, 3 << 30), DeviceFacts("cuda:0", "fp16", 1 << 30, 2 << 30)]
    with pytest.raises(ts.UsageError, match=r"different precisions on the dask workers \(bf16 on 1, fp16 on 1\)"):
        DeviceFacts.common(facts, "auto", "the dask workers")
    assert DeviceFacts.common(facts, "fp16", "the dask workers") == (facts[1], "fp16")  # sized for the smaller


def test_precision_compile_and_memory_budget_reach_the_workers_executors(thread_cluster, slide, net, tmp_path,
                                                                          monkeypatch):
    from tilesegment.executor import Executor

    seen = []
    init = Executor.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append((self.precision, kwargs["compile"], self.memory_budget))

    monkeypatch.setattr(Executor, "__init__", recording)
    monkeypatch.setattr(torch, "compile", lambda model: model)  # inductor is not what is tested
    out = ts.segment(slide, net, tmp_path / "o.zarr", tile_size=64, compile=True, memory_budget=1 << 30,
                     client=thread_cluster, progress=False)
    assert seen and set(seen) == {("fp32", True, 1 << 30)}
    np.testing.assert_array_equal(out[:], ts.segment(slide, net, tile_size=64, progress=False))
