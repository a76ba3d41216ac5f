"""One writer per output: a second run is refused naming the first; dead runs' locks are taken over."""

import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

import tilesegment as ts
from tilesegment.cli import main
from tilesegment.io.lock import Holder, OutputLock, lock_location
from tilesegment.io.manifest import Manifest

from conftest import small_unet

HOST = socket.gethostname()


class WaitsForFlag(torch.nn.Module):
    """A network whose first forward pass waits until `flag` exists (at most 20 s)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.flag = net, None

    geometry = property(lambda self: self.net.geometry)

    def forward(self, x):
        if x.device.type != "meta" and self.flag is not None:
            deadline = time.time() + 20
            while not self.flag.exists() and time.time() < deadline:
                time.sleep(0.005)
        return self.net(x)


def _racer(barrier, rounds, folder, results):
    """One of two processes: each round, segment the same output as the other, at the same moment."""
    net = WaitsForFlag(small_unet(3, 3, base=2, depth=2))
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for i in range(rounds):
        net.flag = folder / f"flag{i}"
        barrier.wait(timeout=60)
        try:
            ts.segment(image, net, folder / f"out{i}.zarr", tile_size=64, device="cpu", precision="fp32",
                       progress=False)
            results.put((i, os.getpid(), "won", ""))
        except ts.OutputBusyError as exc:
            results.put((i, os.getpid(), "lost", str(exc)))
        except Exception as exc:  # anything else fails the test, with what it was
            results.put((i, os.getpid(), "error", repr(exc)))
        finally:
            net.flag.touch()  # the loser lets the winner finish


def test_two_processes_racing_for_one_output_exactly_one_wins_every_time(tmp_path):
    rounds = 20
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(2), spawn.Queue()
    racers = [spawn.Process(target=_racer, args=(barrier, rounds, tmp_path, results)) for _ in range(2)]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=120) for _ in range(2 * rounds)]
    for racer in racers:
        racer.join(timeout=30)
    reference = ts.segment(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8),
                           small_unet(3, 3, base=2, depth=2), tile_size=64, device="cpu", precision="fp32",
                           progress=False)
    for i in range(rounds):
        (won,), (lost,) = ([o for o in outcomes if o[0] == i and o[2] == kind] for kind in ("won", "lost"))
        message = lost[3]
        assert f"'{tmp_path / f'out{i}.zarr'}' is being written by pid {won[1]} on host {HOST} since " in message
        assert message.endswith("(tilesegment segment); wait for it, or stop it first") and "\n" not in message
        out = tmp_path / f"out{i}.zarr"
        assert zarr.open_group(out, mode="r").attrs["tilesegment"]["complete"]  # the loser wrote nothing in it
        np.testing.assert_array_equal(zarr.open_array(out / "0")[:], reference)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("out", "flag"))) == []  # no locks, no tmp


@pytest.fixture
def slide(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb")
    return path


@pytest.fixture
def model(tmp_path):
    torch.manual_seed(0)
    return ts.save_model(ts.UNet(3, 3, base_channels=2, depth=2), tmp_path / "m.pt")


def _args(slide, out, model, *extra):
    return ["segment", str(slide), str(out), "--model", str(model), "--tile-size", "64", "--chunk-size", "64",
            "--device", "cpu", "--quiet", *extra]


def _lock_file(out) -> Path:
    return Path(lock_location(out)[1])


def test_a_live_run_refuses_segment_resume_and_objects_at_once_naming_it(tmp_path, slide, model, capsys):
    out = tmp_path / "out.zarr"
    assert main(_args(slide, out, model)) == 0
    assert not _lock_file(out).exists()
    with OutputLock(out, command="objects"):  # as another run in this process would hold it
        expected = f"'{out}' is being written by pid {os.getpid()} on host {HOST} since "
        with pytest.raises(ts.OutputBusyError, match="^" + expected.replace("(", r"\(")):
            ts.segment(slide, model, out, tile_size=64, overwrite=True, progress=False)
        with pytest.raises(ts.OutputBusyError, match=r"\(tilesegment objects\); wait for it, or stop it first$"):
            ts.label_objects(out, progress=False)
        assert main(_args(slide, out, model, "--overwrite")) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tilesegment: error: {expected}") and err.count("\n") == 1
    # A stopped run to resume: while another run holds the output, resume is refused too (not
    # "pass --resume"), and the blocks saved there are not offered.
    stopped = tmp_path / "stopped.zarr"
    job = ts.prepare(slide, model, stopped, tile_size=64, chunk_size=64)
    stitcher = ts.Stitcher(job.plan, ts.Output(stopped, record=job.record), num_classes=3)
    stitcher.fill([0, 1])
    stitcher.__exit__(KeyboardInterrupt, None, None)
    with OutputLock(stopped):
        assert main(_args(slide, stopped, model, "--resume")) == 2
        err = capsys.readouterr().err
        assert "is being written by" in err and "--resume" not in err
    assert main(_args(slide, stopped, model, "--resume")) == 0


def test_objects_of_an_output_being_segmented_are_refused_and_the_objects_pass_holds_the_lock(
        tmp_path, slide, model, monkeypatch):
    import tilesegment.objects as objects

    out = tmp_path / "out.zarr"
    ts.segment(slide, model, out, tile_size=64, progress=False)
    with OutputLock(out):
        with pytest.raises(ts.OutputBusyError, match=r"\(tilesegment segment\)"):
            ts.label_objects(out, output=tmp_path / "elsewhere.zarr", progress=False)  # reads it still
    assert not (tmp_path / "elsewhere.zarr").exists()
    seen = []
    original = objects.open_sink
    monkeypatch.setattr(objects, "open_sink", lambda *a: seen.append(Holder.from_bytes(
        _lock_file(out).read_bytes())) or original(*a))
    ts.label_objects(out, progress=False)
    assert seen[0].command == "objects" and seen[0].pid == os.getpid()
    assert not _lock_file(out).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path, slide, model, capsys):
    out = tmp_path / "out.zarr"
    # A process that takes the lock and dies without giving it back (as SIGKILL would leave it).
    code = f"import os; from tilesegment.io.lock import OutputLock; OutputLock({str(out)!r}).acquire(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    dead = Holder.from_bytes(_lock_file(out).read_bytes())
    assert dead.host == HOST and dead.pid != os.getpid()
    assert main(_args(slide, out, model)) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"tilesegment: note: '{out}' was locked by pid {dead.pid} on host {HOST} since ")
    assert err.endswith(f"but its process {dead.pid} no longer exists; this run takes the lock over\n")
    assert zarr.open_group(out, mode="r").attrs["tilesegment"]["complete"] and not _lock_file(out).exists()


def test_a_reused_pid_does_not_keep_a_dead_runs_lock(tmp_path):
    out = tmp_path / "out.zarr"
    mine = Holder.this_process("segment")
    if mine.pid_started is None:
        pytest.skip("no /proc: process start times are unknown here")
    # our own pid, but a process that started at another time: the run that wrote it is gone
    _lock_file(out).write_bytes(Holder(HOST, os.getpid(), 0.0, "old", "segment", None, mine.pid_started - 1).to_bytes())
    with pytest.warns(ts.StaleLockWarning, match="the pid is another process's now"):
        with OutputLock(out) as lock:
            assert lock.held
    assert not _lock_file(out).exists()


def test_a_lock_of_another_host_on_a_shared_disk_is_live_until_it_was_not_renewed_for_the_lease(tmp_path):
    from tilesegment.io import lock as locks

    out = tmp_path / "out.zarr"
    path = _lock_file(out)
    path.write_bytes(Holder("elsewhere", 1, time.time() - 3600, "theirs", "segment").to_bytes())
    with pytest.raises(ts.OutputBusyError, match="pid 1 on host elsewhere"):
        OutputLock(out).acquire()
    old = time.time() - locks.SHARED_LEASE_S - 60
    os.utime(path, (old, old))
    with pytest.warns(ts.StaleLockWarning, match="it was not renewed for 16 minutes"):
        with OutputLock(out):
            os.utime(path, (old, old))
            with pytest.raises(ts.OutputBusyError):  # this host's: alive by its pid, whatever the file's time
                OutputLock(out).check()
    assert not path.exists()


def test_the_lock_is_gone_after_success_error_and_ctrl_c_and_resume_works(tmp_path, slide, model, monkeypatch):
    out = tmp_path / "ok.zarr"
    ts.segment(slide, model, out, tile_size=64, progress=False)
    assert not _lock_file(out).exists()
    calls = {"n": 0}
    original_add = ts.Stitcher.add

    def failing_add(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise calls["error"]
        return original_add(self, *args, **kwargs)

    monkeypatch.setattr(ts.Stitcher, "add", failing_add)
    for name, error, status in (("error.zarr", RuntimeError("model exploded"), 1),
                                ("ctrl-c.zarr", KeyboardInterrupt(), 130)):
        calls.update(n=0, error=error)
        out = tmp_path / name
        assert main(_args(slide, out, model)) == status
        assert not _lock_file(out).exists() and 0 < len(Manifest(out).done_blocks()) < 16
    monkeypatch.setattr(ts.Stitcher, "add", original_add)
    for name in ("error.zarr", "ctrl-c.zarr"):
        assert main(_args(slide, tmp_path / name, model, "--resume")) == 0
        assert not _lock_file(tmp_path / name).exists()
