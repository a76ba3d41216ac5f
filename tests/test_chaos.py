"""Killed anywhere (SIGKILL), `segment --objects` resumed with --resume gives byte-identical outputs.

Every scenario runs the command in a child process (`tests/_chaos.py`), kills
it with SIGKILL at a chosen call of an internal function (one or more phases
per scenario: tile reads, chunk writes, block markers, the manifest, pyramid
levels, metadata, the objects pass, the table, the GeoJSON) or after a random
delay, reruns it with ``--resume`` until it exits 0, and requires the output
folder to hold exactly the files of an uninterrupted run, byte for byte.
``benchmarks/chaos.py`` runs a longer random sweep of the same harness.
"""

from __future__ import annotations

import os
import random

import pytest

import tilesegment as ts

import _chaos as chaos
from _chaos import Kill
from conftest import small_unet

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the chaos harness forks")

#: Kill points of a single-slide run: (phase, call), in the order a run meets them. The
#: n-th call counts from the start of the run (`CALLS`: 17 tiles and blocks, 9 + 5 chunks of
#: the two pyramid levels, then 1 of the objects' second level, 9 GeoJSON writes).
SINGLE = [
    [Kill("manifest start", 1)],
    [Kill("store write", 1)],  # the group's zarr.json, before its array
    [Kill("tile read", 1)],
    [Kill("tile read", 10)],
    [Kill("stitch", 5)],
    [Kill("chunk write", 1)],
    [Kill("block marked", 8)],  # chunks on disk, block not yet recorded
    [Kill("block marked", 17)],  # every block recorded, nothing finished
    [Kill("pyramid level", 1)],
    [Kill("pyramid level", 9)],  # level 1 written, level 2 not begun
    [Kill("metadata", 1)],  # OME metadata written, completion record not
    [Kill("file removal", 10)],  # half the block markers removed
    [Kill("folder removal", 1)],  # markers gone, run.json not
    [Kill("manifest finish", 1)],
    [Kill("objects labels/", 1)],  # labels/ lists objects that do not exist yet
    [Kill("objects measure", 1)],
    [Kill("objects write", 1)],  # labels/objects half written
    [Kill("pyramid level", 15)],  # the objects' own pyramid
    [Kill("objects finish", 1)],
    [Kill("objects source", 2)],  # labels/objects complete, its image-label source not yet
    [Kill("table", 1)],  # the table written to its temporary, not renamed
    [Kill("geojson", 5)],  # half a GeoJSON
    [Kill("final rename", 51)],  # the GeoJSON complete, not renamed
    # Killed again while resuming: in the swap of a redone labels/objects, and twice in a row.
    [Kill("objects write", 1), Kill("swap rename", 1)],
    [Kill("chunk write", 3), Kill("chunk write", 6), Kill("pyramid level", 3)],
]

#: Kill points of a batch run of two slides into a folder (counts run across both slides).
BATCH = [
    [Kill("block marked", 19)],  # in the second slide's blocks
    [Kill("geojson", 3)],  # in the first slide's GeoJSON: the second is not started
    [Kill("objects write", 2)],  # in the second slide's objects
]


def _name(kills) -> str:
    return " then ".join(map(str, kills))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos")
    inputs = root / "in"
    inputs.mkdir()
    a = chaos.slide(inputs / "a.tif")
    b = chaos.slide(inputs / "b.tif", (300, 64), seed=1)
    model = ts.save_model(small_unet(3, 3, base=4, depth=2, seed=3), inputs / "m.pt")
    common = ["--model", str(model), "--tile-size", "128", "--chunk-size", "128", "--objects", "--device", "cpu",
              "--quiet"]
    chaos.warm_parent()
    single = chaos.Case.make(lambda out: ["segment", str(a), str(out / "a.zarr"), *common], root / "single",
                             in_process=True)
    batch = chaos.Case.make(lambda out: ["segment", str(a), str(b), str(out), *common], root / "batch")
    return {"root": root, "single": single, "batch": batch}


@pytest.mark.parametrize("kills", SINGLE, ids=_name)
def test_segment_objects_killed_anywhere_resumes_to_identical_files(cases, kills):
    outcome = chaos.scenario(cases["single"], kills, cases["root"] / f"s-{_name(kills).replace(' ', '_')}")
    assert not outcome.missed, f"kill points not reached: {outcome.missed}"
    assert outcome.identical, f"runs {outcome.codes}: " + "; ".join(outcome.differences[:8])


@pytest.mark.parametrize("kills", BATCH, ids=_name)
def test_a_killed_batch_resumes_to_identical_files(cases, kills):
    outcome = chaos.scenario(cases["batch"], kills, cases["root"] / f"b-{_name(kills).replace(' ', '_')}")
    assert not outcome.missed, f"kill points not reached: {outcome.missed}"
    assert outcome.identical, f"runs {outcome.codes}: " + "; ".join(outcome.differences[:8])


@pytest.mark.parametrize("seed", [1, 2])
def test_random_kills_resume_to_identical_files(cases, seed):
    """Two random kills in a row: a random phase and call, or a random moment."""
    rng = random.Random(seed)
    kills = chaos.random_kills(rng, CALLS, 1.5, 2)
    outcome = chaos.scenario(cases["single"], kills, cases["root"] / f"r-{seed}")
    assert outcome.identical, f"{_name(kills)}, runs {outcome.codes}: " + "; ".join(outcome.differences[:8])


#: Calls of each kill point in an uninterrupted single-slide run (`chaos.count_calls`), for
#: the random kills; a kill beyond a count would simply not land.
CALLS = {"tile read": 17, "stitch": 17, "chunk write": 17, "block marked": 17, "store write": 55,
         "pyramid level": 15, "metadata": 2, "file removal": 23, "folder removal": 2, "objects measure": 1,
         "objects write": 1, "objects source": 2, "table": 1, "geojson": 9, "final rename": 51}
