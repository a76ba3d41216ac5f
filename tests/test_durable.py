"""Completion records that survive a power loss: chunks fsynced before their block's marker."""

import os
import subprocess
import sys

import numpy as np
import pytest

import tilesegment as ts
from tilesegment.io import durable
from tilesegment.io.manifest import Manifest

from conftest import small_unet


@pytest.fixture
def events(monkeypatch):
    """What reached the disk, in order: ("file", path), ("folder", path), ("put", path), ("finish", root)."""
    seen = []
    fsync_file, fsync_folder, put, finish = durable.fsync_file, durable.fsync_folder, Manifest._put, Manifest.finish
    monkeypatch.setattr(durable, "ENABLED", True)
    monkeypatch.setattr(durable, "fsync_file", lambda p: seen.append(("file", os.fspath(p))) or fsync_file(p))
    monkeypatch.setattr(durable, "fsync_folder", lambda p: seen.append(("folder", os.fspath(p))) or fsync_folder(p))
    monkeypatch.setattr(Manifest, "_put", lambda self, p, d: seen.append(("put", p)) or put(self, p, d))
    monkeypatch.setattr(Manifest, "finish", lambda self: seen.append(("finish", self.folder)) or finish(self))
    return seen


def _segment(out, **kwargs):
    image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    # Tiles of 64 over chunks of 32: each block is one tile and four chunk files.
    return ts.segment(image, small_unet(3, 3, base=2, depth=2), out, tile_size=64, chunk_size=32, device="cpu",
                      precision="fp32", progress=False, **kwargs)


def test_a_block_marker_is_created_only_after_its_chunk_files_and_their_folders_are_fsynced(tmp_path, events):
    out = tmp_path / "out.zarr"
    _segment(out)  # on CPU one writer thread: the blocks' events do not interleave
    markers = [i for i, (kind, path) in enumerate(events) if kind == "put" and path.split("/")[-1].isdigit()]
    assert len(markers) == 4
    previous = next(i for i, (_, path) in enumerate(events) if "/0/c/" in path)  # after the run record
    rows_seen = set()
    for at in markers:
        block = int(events[at][1].split("/")[-1])
        by, bx = divmod(block, 2)
        expected = {os.fspath(out / "0" / "c" / str(2 * by + dy) / str(2 * bx + dx)) for dy in (0, 1) for dx in (0, 1)}
        before = events[previous:at]
        assert {p for kind, p in before if kind == "file"} == expected
        # then, once each, the folders holding them, and those above only for a new folder below
        synced_folders = [p for kind, p in before if kind == "folder"]
        chunk_rows = {os.path.dirname(p) for p in expected}
        # a new row folder's entry is in c/, and c/'s in 0/ (new at the first block only)
        above = {os.fspath(out / "0" / "c")} | ({os.fspath(out / "0")} if not rows_seen else set())
        new_rows = chunk_rows - rows_seen
        assert sorted(synced_folders) == sorted(chunk_rows | (above if new_rows else set()))
        rows_seen |= chunk_rows
        assert before[:4] == [("file", p) for kind, p in before[:4]]  # files first, then folders
        # the marker (written and fsynced by its handle), then the done/ folder that holds it
        assert events[at + 1] == ("folder", os.path.dirname(events[at][1]))
        previous = at + 2


def test_pyramid_and_metadata_are_fsynced_before_the_manifest_is_removed(tmp_path, events, monkeypatch):
    from tilesegment.io import ngff, sinks

    # a pyramid down to 32 px, so that this small output has levels
    monkeypatch.setattr(sinks, "pyramid_factors", lambda *a, **k: ngff.pyramid_factors(*a, smallest=32))
    out = tmp_path / "out.zarr"
    _segment(out)
    finish = next(i for i, (kind, _) in enumerate(events) if kind == "finish")
    synced = {p for kind, p in events[:finish] if kind in ("file", "folder")}
    assert os.fspath(out / "zarr.json") in synced and os.fspath(out / "0" / "zarr.json") in synced
    assert os.fspath(out) in synced
    levels = [os.path.join(d, f) for level in ("1", "2") for d, _, names in os.walk(out / level) for f in names]
    assert len(levels) == 1 + 4 + 1 + 1 and set(levels) <= synced  # metadata and chunks of 64 and 32 px
    # the manifest's removal, then the output's entry in its folder
    assert events[finish + 1:] == [("folder", os.fspath(out)), ("folder", os.fspath(tmp_path))]


def test_an_overwrite_is_swapped_in_and_the_swap_fsynced(tmp_path, events):
    out = tmp_path / "out.zarr"
    _segment(out)
    events.clear()
    _segment(out, overwrite=True)
    assert events[-1] == ("folder", os.fspath(tmp_path))  # after the rename, before reporting done


def test_with_fsync_off_nothing_is_synced_and_the_output_is_the_same(tmp_path, events, monkeypatch):
    monkeypatch.setattr(durable, "ENABLED", False)
    off = _segment(tmp_path / "off.zarr")[:]
    assert [e for e in events if e[0] in ("file", "folder")] == []
    monkeypatch.setattr(durable, "ENABLED", True)
    np.testing.assert_array_equal(_segment(tmp_path / "on.zarr")[:], off)


@pytest.mark.parametrize("value, enabled", [("0", False), ("1", True)])
def test_the_environment_variable_is_the_switch(value, enabled):
    code = "import tilesegment.io.durable as d; print(d.ENABLED)"
    env = {**os.environ, "TILESEGMENT_FSYNC": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(enabled)
