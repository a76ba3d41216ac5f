"""Resumable runs: a killed run continues where it stopped and gives the same output."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch
import zarr

import tilesegment as ts
from tilesegment.cli import main
from tilesegment.io.manifest import Manifest


@pytest.fixture
def slide(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (640, 640, 3), dtype=np.uint8)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb")
    return path


@pytest.fixture
def model(tmp_path):
    torch.manual_seed(0)
    return ts.save_model(ts.UNet(3, 3, base_channels=4, depth=2), tmp_path / "m.pt")


def _args(slide, out, model, *extra):
    return ["segment", str(slide), str(out), "--model", str(model), "--tile-size", "64", "--chunk-size", "64",
            "--quiet", *extra]


def test_sigkilled_run_resumes_to_the_identical_output_recomputing_only_the_rest(tmp_path, slide, model, monkeypatch):
    reference = tmp_path / "reference.zarr"
    assert main(_args(slide, reference, model)) == 0
    out = tmp_path / "out.zarr"
    # A slow model (sleep per tile) so the run can be killed midway.
    slow = tmp_path / "slow.py"
    slow.write_text(
        "import time, torch, tilesegment as ts\n"
        "net = ts.load_model(%r)\n"
        "class Slow(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.net = net\n"
        "    geometry = net.geometry\n"
        "    def forward(self, x):\n"
        "        if x.device.type != 'meta': time.sleep(0.05)\n"
        "        return self.net(x)\n"
        "def build():\n"
        "    return Slow()\n" % str(model)
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "tilesegment.cli", *_args(slide, out, "slow:build")]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    manifest, blocks = Manifest(out), 100
    deadline = time.time() + 120
    while len(manifest.done_blocks()) < 0.6 * blocks and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(manifest.done_blocks())
    assert 0 < done_before < blocks
    assert "ome" not in zarr.open_group(out, mode="r").attrs  # not mistakable for a finished image

    with pytest.raises(ts.OutputExistsError):
        ts.prepare(slide, model, out)
    with pytest.raises(ts.UsageError, match="cannot resume .*model was"):
        ts.prepare(slide, model, out, tile_size=64, chunk_size=64, resume=True)  # the plain model is not the slow one
    monkeypatch.syspath_prepend(str(tmp_path))
    job = ts.prepare(slide, "slow:build", out, tile_size=64, chunk_size=64, resume=True)
    assert job.resume and len(job.done_blocks) == done_before
    computed = []
    original = job.tiler._read_tile
    job.tiler._read_tile = lambda index, *a: computed.append(index) or original(index, *a)
    job.run(progress=False)
    assert len(computed) == blocks - done_before  # one tile per block here
    np.testing.assert_array_equal(zarr.open_array(out / "0")[:], zarr.open_array(reference / "0")[:])
    group = zarr.open_group(out, mode="r")
    assert group.attrs["tilesegment"]["complete"] and not (out / ".tilesegment").exists()


def test_resume_with_other_settings_is_refused(tmp_path, slide, model):
    out = tmp_path / "out.zarr"
    job = ts.prepare(slide, model, out, tile_size=64, chunk_size=64)
    # Leave a stopped run behind: two blocks written, then interrupted.
    stitcher = ts.Stitcher(job.plan, ts.Output(out, record=job.record), num_classes=3)
    stitcher.fill([0, 1])
    stitcher.__exit__(KeyboardInterrupt, None, None)
    assert len(Manifest(out).done_blocks()) == 2
    with pytest.raises(ts.UsageError, match="cannot resume .*tile_size was \\[64, 64\\], now \\[128, 128\\]"):
        ts.prepare(slide, model, out, tile_size=128, resume=True)
    other = ts.save_model(ts.UNet(3, 3, base_channels=4, depth=2), tmp_path / "other.pt")
    with pytest.raises(ts.UsageError, match="cannot resume .*model was"):
        ts.prepare(slide, other, out, tile_size=64, chunk_size=64, resume=True)
    with pytest.raises(ts.UsageError, match="exclude each other"):
        ts.prepare(slide, model, out, tile_size=64, chunk_size=64, resume=True, overwrite=True)


def test_ctrl_c_keeps_a_resumable_output_and_says_how_to_resume(tmp_path, slide, model, capsys, monkeypatch):
    calls = {"n": 0}
    original_add = ts.Stitcher.add

    def interrupting_add(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 30:
            raise KeyboardInterrupt
        return original_add(self, *args, **kwargs)

    monkeypatch.setattr(ts.Stitcher, "add", interrupting_add)
    out = tmp_path / "out.zarr"
    assert main(_args(slide, out, model)) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "blocks are saved" in err
    monkeypatch.setattr(ts.Stitcher, "add", original_add)
    done = len(Manifest(out).done_blocks())
    # Run again as a user would, forgetting --resume: told to add it, and nothing changes.
    assert main(_args(slide, out, model)) == 2
    err = capsys.readouterr().err
    assert "stopped before it finished; pass --resume to finish it, or --overwrite" in err
    assert len(Manifest(out).done_blocks()) == done
    assert main([a for a in _args(slide, out, model, "--resume") if a != "--quiet"]) == 0
    assert not (out / ".tilesegment").exists()
    # The summary counts only the tiles this run computed (one tile per block here).
    computed = int(re.search(r"done +(\d+) tiles computed", capsys.readouterr().err).group(1))
    assert computed == ts.prepare(slide, model, tmp_path / "fresh.zarr", tile_size=64, chunk_size=64).plan.n_tiles - done


def test_a_run_stopped_while_building_the_pyramid_resumes(tmp_path, monkeypatch):
    from tilesegment.io.sinks import ZarrSink

    torch.manual_seed(0)
    net = ts.UNet(3, 3, base_channels=4, depth=2).eval()
    image = np.random.default_rng(1).integers(0, 256, (1100, 300, 3), dtype=np.uint8)
    out = tmp_path / "o.zarr"

    def killed(self, n_levels):
        raise KeyboardInterrupt  # after every block and pyramid level 1 are written

    monkeypatch.setattr(ZarrSink, "_metadata", killed)
    with pytest.raises(KeyboardInterrupt):
        ts.segment(image, net, out, tile_size=128, progress=False)
    assert (out / "1").exists() and Manifest(out).exists
    monkeypatch.undo()
    resumed = ts.segment(image, net, out, tile_size=128, resume=True, progress=False)
    np.testing.assert_array_equal(resumed[:], ts.segment(image, net, tile_size=128, progress=False))
    assert zarr.open_array(out / "1").shape == (550, 150)


def test_progress_callable_hears_every_tile_and_a_cancel_leaves_a_resumable_output(tmp_path, slide, model):
    import threading

    reference = ts.segment(slide, model, tile_size=64, chunk_size=64, progress=False)
    seen, cancel = [], threading.Event()

    def progress(done, total):
        seen.append((done, total))
        if done >= 20:
            cancel.set()  # as a GUI's cancel button would, from any thread

    out = tmp_path / "o.zarr"
    with pytest.raises(ts.Cancelled, match=r"after \d+ of 100 tiles; the finished blocks are kept .*resume=True"):
        ts.segment(slide, model, out, tile_size=64, chunk_size=64, progress=progress, cancel=cancel)
    assert seen[0] == (0, 100) and all(b[0] > a[0] for a, b in zip(seen, seen[1:]))
    stopped_at = seen[-1][0]
    # No batch starts after the cancel; the ones already computed are kept: batch 1, and at most
    # three in flight (two in the results queue, depth 2 x one executor, and one the executor
    # holds while the queue is full; how many depends on the machine's timing)
    assert 20 <= stopped_at <= 23
    done = len(Manifest(out).done_blocks())
    # One tile per block: the blocks recorded are finished tiles; writes still queued (at most
    # 2 per writer thread, with the fsync of each block slow on a loaded disk) may be dropped.
    assert stopped_at - 4 <= done <= stopped_at
    resumed_seen = []
    resumed = ts.segment(slide, model, out, tile_size=64, chunk_size=64, resume=True,
                         progress=lambda d, t: resumed_seen.append((d, t)))
    assert resumed_seen[0] == (0, 100 - done) and resumed_seen[-1] == (100 - done, 100 - done)
    np.testing.assert_array_equal(resumed[:], reference)


def test_a_progress_callback_returning_false_cancels(tmp_path, slide, model):
    out = tmp_path / "o.zarr"
    with pytest.raises(ts.Cancelled):
        ts.segment(slide, model, out, tile_size=64, chunk_size=64, progress=lambda done, total: done < 10)
    assert 10 <= len(Manifest(out).done_blocks()) < 100
    assert ts.prepare(slide, model, out, tile_size=64, chunk_size=64, resume=True).resume


def test_cancelling_an_in_memory_run_says_the_result_is_dropped(slide, model):
    with pytest.raises(ts.Cancelled, match="in-memory result is dropped"):
        ts.segment(slide, model, tile_size=64, progress=False, cancel=lambda: True)


def test_cancelling_before_a_block_is_finished_says_nothing_was_kept(tmp_path, slide, model):
    out = tmp_path / "o.zarr"
    with pytest.raises(ts.Cancelled, match="before a block was finished; .* was not kept"):
        ts.segment(slide, model, out, tile_size=64, progress=False, cancel=lambda: True)
    assert not out.exists()  # and indeed: nothing to resume, nothing left behind


@pytest.fixture
def slow_model(tmp_path, model):
    """A module `slow` whose `build()` is the model slowed by 50 ms per tile, and the environment
    that lets a subprocess import it. 100 tiles take 5 s: with 20 ms a loaded CI machine once
    let the run finish before the test could signal it."""
    (tmp_path / "slow.py").write_text(
        "import time, torch, tilesegment as ts\n"
        "net = ts.load_model(%r)\n"
        "class Slow(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.net = net\n"
        "    geometry = net.geometry\n"
        "    def forward(self, x):\n"
        "        if x.device.type != 'meta': time.sleep(0.05)\n"
        "        return self.net(x)\n"
        "def build():\n"
        "    return Slow()\n" % str(model)
    )
    return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_stop_cleanly_print_the_resume_command_and_resume_to_identical(
        tmp_path, slide, model, slow_model, sig, monkeypatch, capsys):
    reference = tmp_path / "reference.zarr"
    assert main(_args(slide, reference, model)) == 0
    out = tmp_path / "out.zarr"
    args = _args(slide, out, "slow:build")
    proc = subprocess.Popen([sys.executable, "-m", "tilesegment.cli", *args], env=slow_model,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(Manifest(out).done_blocks()) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
    lines = err.strip().splitlines()
    assert lines[-1] == ("tilesegment: stopped by SIGTERM" if sig == signal.SIGTERM else "tilesegment: interrupted")
    command = f"tilesegment {' '.join(args)} --resume"
    assert re.fullmatch(rf"tilesegment: \d+ of 100 blocks are saved in {re.escape(str(out))}; run the same command "
                        rf"with --resume to continue: {re.escape(command)}", lines[-2]), err
    assert "Traceback" not in err
    done = len(Manifest(out).done_blocks())
    assert 0 < done < 100 and "ome" not in zarr.open_group(out, mode="r").attrs

    monkeypatch.syspath_prepend(str(tmp_path))
    assert main([*args, "--resume"]) == 0
    assert not (out / ".tilesegment").exists()
    chunks = sorted(p.relative_to(reference) for p in (reference / "0").rglob("*") if p.is_file())
    assert chunks == sorted(p.relative_to(out) for p in (out / "0").rglob("*") if p.is_file())
    assert all((out / c).read_bytes() == (reference / c).read_bytes() for c in chunks)
