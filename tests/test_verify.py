"""`tilesegment verify`: a good output passes in one line; each kind of damage is one line."""

import json
import shutil

import numpy as np
import pytest
import zarr

import tilesegment as ts
from tilesegment.cli import main
from tilesegment.io.verify import verify_output

from conftest import small_unet


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A finished output with a pyramid level and labels/objects (1100 x 128 px, 9 + 5 chunks, objects 1 + 1)."""
    root = tmp_path_factory.mktemp("verify")
    image = np.random.default_rng(0).integers(0, 256, (1100, 128, 3), dtype=np.uint8)
    out = root / "good.zarr"
    ts.segment(image, small_unet(3, 3, base=4, depth=2, seed=3), out, tile_size=128, chunk_size=128, progress=False)
    ts.label_objects(out, progress=False)
    return out


@pytest.fixture
def copy(good, tmp_path):
    out = tmp_path / "out.zarr"
    shutil.copytree(good, out)
    return out


def _verify(out, capsys):
    code = main(["verify", str(out)])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


def test_a_finished_output_verifies_in_one_line(good, capsys):
    code, lines, err = _verify(good, capsys)
    assert code == 0 and len(lines) == 1 and not err
    assert lines[0].startswith(f"ok       {good}: 4 arrays, 16 chunks ") and "run complete" in lines[0]


@pytest.mark.parametrize("damage, problem", [
    ("delete a chunk", r"out.zarr/0: chunk c/3/0 is missing"),
    ("corrupt a chunk", r"out.zarr/1: chunk c/1/0 cannot be decoded \(.*\)"),
    ("delete a pyramid level", r"out.zarr/1: pyramid level listed in the metadata is missing"),
    ("wrong scale", r"out.zarr/1: scale \[2.0, 2.0, 2.0\] does not have one value per axis \(2\)"),
    ("no multiscales", r"out.zarr: no OME multiscales metadata"),
    ("objects of another shape", r"out.zarr/labels/objects: shape \(1100, 127\), its image is \(1100, 128\)"),
    ("objects not listed", r"out.zarr/labels/ghost: listed in labels/ but missing"),
    ("unfinished run", r"out.zarr: a run stopped before it finished \(2 blocks recorded .*--resume"),
    ("a killed write's temporary", r"out.zarr/0/c/0/0\.1234\.partial: temporary of a write that was killed"),
])
def test_each_kind_of_damage_is_one_line_and_exit_1(copy, capsys, damage, problem):
    import re

    group = zarr.open_group(copy, mode="r+")
    ome = dict(group.attrs["ome"])
    if damage == "delete a chunk":
        (copy / "0" / "c" / "3" / "0").unlink()
    elif damage == "corrupt a chunk":
        chunk = copy / "1" / "c" / "1" / "0"
        chunk.write_bytes(b"\0" * 16 + chunk.read_bytes()[16:])
    elif damage == "delete a pyramid level":
        shutil.rmtree(copy / "1")
    elif damage == "wrong scale":
        ome["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"] = [2.0, 2.0, 2.0]
        group.attrs["ome"] = ome
    elif damage == "no multiscales":
        group.attrs["ome"] = {"version": "0.5"}
    elif damage == "objects of another shape":
        objects = copy / "labels" / "objects"
        for level in ("0", "1"):  # a consistent label image, one column short
            meta = json.loads((objects / level / "zarr.json").read_text())
            shape = zarr.open_array(objects / level).shape
            meta["shape"] = [shape[0], shape[1] - 1 if level == "0" else -(-(shape[1] * 2 ** int(level) - 1) // 2 ** int(level))]
            (objects / level / "zarr.json").write_text(json.dumps(meta))
    elif damage == "objects not listed":
        labels = zarr.open_group(copy / "labels", mode="r+")
        labels.attrs["ome"] = {**labels.attrs["ome"], "labels": ["objects", "ghost"]}
    elif damage == "unfinished run":
        (copy / ".tilesegment" / "done").mkdir(parents=True)
        (copy / ".tilesegment" / "run.json").write_text("{}")
        for block in (0, 1):
            (copy / ".tilesegment" / "done" / str(block)).write_bytes(b"")
    elif damage == "a killed write's temporary":
        (copy / "0" / "c" / "0" / "0.1234.partial").write_bytes(b"half")
    code, lines, err = _verify(copy, capsys)
    assert code == 1 and f"1 problem(s) in {copy}" in err, lines
    assert len(lines) == 1 and re.fullmatch(rf"problem  .*{problem}", lines[0]), lines


def test_ngff_04_outputs_and_probabilities_verify(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    net = small_unet(3, 3, base=4, depth=2, seed=3)
    for ngff, mode in (("0.4", "labels"), ("0.5", "probabilities")):
        out = tmp_path / f"{ngff}-{mode}.zarr"
        ts.segment(image, net, out, tile_size=64, mode=mode, ngff=ngff, progress=False)
        ts.label_objects(out, progress=False)
        found = verify_output(out)
        assert found.ok and found.ngff == ngff, found.problems


def test_verify_a_missing_path_is_a_usage_error(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nothing.zarr")]) == 2
    assert capsys.readouterr().err.startswith("tilesegment: error: ")
