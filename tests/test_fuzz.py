"""Damaged and hostile inputs: a seeded fuzz run of the CLI, and one test for each bug it found.

The fuzz run (`tilesegment._fuzz`) damages copies of real inputs (TIFF, SVS,
OME-TIFF, the shared Aperio slide, OME-Zarr, checkpoints, bioimage.io
packages) and runs ``segment`` or ``info`` on each in a fresh folder. Every
case must finish (``ok``, or ``skipped``: a damaged tile filled and
recorded) or exit 1 or 2 with one line naming the file; never a traceback,
the CLI's catch-all line, a hang, a crash signal, or a file written outside
the output. ``benchmarks/fuzz.py`` runs many more seeds.
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import tilesegment as ts
from tilesegment import _fuzz as fuzz
from tilesegment.cli import main

from conftest import small_unet

SEED, COUNT = 2024, 300


def _package(folder: Path):
    """A small valid bioimage.io package, built as tests/test_bioimageio.py builds it; None without
    bioimageio.spec/core."""
    try:
        pytest.importorskip("bioimageio.spec")
        pytest.importorskip("bioimageio.core")
        from test_bioimageio import build_package
    except pytest.skip.Exception:
        return None
    return build_package(folder)[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    return fuzz.make_inputs(folder / "inputs", package=_package(folder / "package"))


def test_every_damaged_input_ends_in_a_result_or_one_line_that_names_the_file(inputs, tmp_path, capsys):
    kinds = [k for k in fuzz.KINDS if k in inputs]
    cases = fuzz.plan_cases(SEED, COUNT, kinds)
    start = time.perf_counter()
    results = fuzz.run_cases(cases, inputs, tmp_path / "work", timeout=20)
    seconds = time.perf_counter() - start
    by_kind: dict[str, dict[str, int]] = {}
    for r in results:
        by_kind.setdefault(r.kind, {}).setdefault(r.outcome, 0)
        by_kind[r.kind][r.outcome] += 1
    with capsys.disabled():
        print(f"\nfuzz: {len(results)} cases in {seconds:.1f} s: {fuzz.count_outcomes(results)}")
        for kind, counts in sorted(by_kind.items()):
            print(f"  {kind:13} {dict(sorted(counts.items()))}")
    bad = [r for r in results if r.outcome in fuzz.BAD]
    assert not bad, "\n".join(f"case {r.index} {r.kind}: {r.mutation} | {r.command} -> {r.outcome}: "
                              f"{r.message[:600]}" for r in bad[:10])
    assert len(results) == COUNT
    counts = fuzz.count_outcomes(results)
    assert {"ok", "skipped", "exit1", "exit2"} <= set(counts)  # every clean outcome is exercised


def test_the_worker_reports_a_crash_signal_as_one_failed_case_and_goes_on(inputs, tmp_path, monkeypatch):
    """The harness itself: a case that kills its process is a ``crash``, and the cases after it run."""
    cases = fuzz.plan_cases(1, 3, ["checkpoint"])
    monkeypatch.setenv("TILESEGMENT_FUZZ_CRASH_AT", str(cases[1].index))
    results = fuzz.run_cases(cases, inputs, tmp_path / "work", timeout=20)
    assert [r.outcome for r in results][1] == "crash" and len(results) == 3
    assert results[1].code < 0 and all(r.outcome not in fuzz.BAD for r in (results[0], results[2]))


# --------------------------------------------------------------------------- TIFF


def _tiff(tmp_path, compression="jpeg") -> Path:
    return fuzz._tiff(tmp_path / "in.tif", compression)


def _entry(path: Path, code: int) -> dict:
    return next(e for e in fuzz._tiff_layout(path)["entries"] if e["code"] == code)


def _poke(path: Path, at: int, value: int, size: int) -> None:
    data = bytearray(path.read_bytes())
    fuzz._put(data, at, value, size, "<")
    path.write_bytes(bytes(data))


def test_a_damaged_resolution_tag_means_an_unknown_pixel_size_not_a_crash(tmp_path):
    path = _tiff(tmp_path)
    _poke(path, _entry(path, 282)["at"] + 4, 0, 4)  # XResolution with count 0 (was: IndexError)
    source = ts.open_image(path)
    assert source.pixel_size is None and source.read(0, 8, 0, 8).shape == (8, 8, 3)


def test_an_ifd_entry_of_the_wrong_type_is_an_input_error_naming_the_file(tmp_path):
    path = _tiff(tmp_path)
    _poke(path, _entry(path, 284)["at"] + 2, 1, 2)  # PlanarConfiguration as BYTE (was: ValueError)
    with pytest.raises(ts.InputError, match=r"cannot read in.tif: its TIFF structure is damaged"):
        ts.open_image(path)


def test_a_tiff_whose_first_ifd_is_missing_says_so(tmp_path):
    path = _tiff(tmp_path)
    _poke(path, 4, path.stat().st_size + 4096, 4)  # first IFD beyond the end (was: "0..-1")
    with pytest.raises(ts.InputError, match="in.tif holds no image that tifffile can read"):
        ts.open_image(path)


@pytest.mark.parametrize("slide", ["generated", "shared"])
def test_a_damaged_width_that_needs_more_tiles_than_the_file_lists_is_refused(tmp_path, request, slide):
    if slide == "shared":
        path = tmp_path / "small_HE.svs"
        shutil.copyfile(request.getfixturevalue("shared_svs"), path)
    else:
        path = _tiff(tmp_path)
    _poke(path, _entry(path, 256)["at"] + 8, 60000, 2)  # ImageWidth (was: a slow run over missing tiles)
    with pytest.raises(ts.InputError, match=rf"{path.name} is damaged: its size .* needs \d+ tiles .* lists"):
        ts.open_image(path)


def test_tifffile_log_lines_stay_off_stderr_unless_debug(tmp_path):
    """In its own process: pytest's log capture would hide the lines this is about."""
    import os
    import subprocess
    import sys

    path = _tiff(tmp_path)
    path.write_bytes(path.read_bytes()[:20000])  # tifffile logs two errors, then we fail
    env = {**os.environ, "PYTHONPATH": str(Path(ts.__file__).parents[1])}
    for debug in ([], ["--debug"]):
        run = subprocess.run([sys.executable, "-m", "tilesegment.cli", *debug, "info", str(path)], env=env,
                             capture_output=True, text=True, timeout=120)
        err = run.stderr.strip().splitlines()
        if debug:
            assert run.returncode == 1 and "corrupted tag list" in run.stderr and "Traceback" in run.stderr
        else:
            assert run.returncode == 2 and len(err) == 1 and err[0].startswith("tilesegment: error:")
            assert "in.tif" in err[0]


# --------------------------------------------------------------------------- zarr


def _zarr(tmp_path, version=3) -> Path:
    return fuzz._zarr_image(tmp_path / "in.ome.zarr", version)


@pytest.mark.parametrize("version,document", [(3, "1/zarr.json"), (2, "1/.zarray"), (2, ".zattrs")])
def test_a_truncated_metadata_document_is_named(tmp_path, version, document):
    store = _zarr(tmp_path, version)
    target = store / document
    target.write_bytes(target.read_bytes()[:20])  # was: JSONDecodeError from the catch-all
    with pytest.raises(ts.InputError, match=rf"metadata '.*in.ome.zarr/{document}' is damaged \(JSONDecodeError"):
        ts.open_image(store)


def _edit(store: Path, document: str, change) -> None:
    meta = json.loads((store / document).read_text())
    change(meta)
    (store / document).write_text(json.dumps(meta))


def _multiscale(meta):
    return meta["attributes"]["ome"]["multiscales"][0]


@pytest.mark.parametrize("change,match", [
    (lambda m: m["attributes"]["ome"]["multiscales"].insert(0, -1), "multiscales of .* are malformed"),
    (lambda m: _multiscale(m)["datasets"][1].pop("path"), "multiscales of .* are malformed"),
    (lambda m: _multiscale(m)["axes"].__setitem__(2, -1), "OME axes of .* are malformed"),
    (lambda m: _multiscale(m)["datasets"][0].__setitem__("path", "9"), "dataset '9' .* does not exist"),
])
def test_malformed_multiscales_are_input_errors_that_say_what(tmp_path, change, match):
    store = _zarr(tmp_path)
    _edit(store, "zarr.json", change)  # were: TypeError, KeyError, AttributeError, KeyError
    with pytest.raises(ts.InputError, match=match):
        ts.open_image(store)


def test_a_scale_that_is_not_a_positive_number_means_an_unknown_pixel_size(tmp_path):
    store = _zarr(tmp_path)
    _edit(store, "zarr.json", lambda m: _multiscale(m)["datasets"][0].__setitem__(
        "coordinateTransformations", [{"type": "scale", "scale": ["nan", 0, "a"]}]))  # was: ValueError
    assert ts.open_image(store).pixel_size is None


@pytest.mark.parametrize("change,match", [
    (lambda m: m.__setitem__("data_type", ">f8"), "zarr metadata is damaged or unsupported .*data type"),
    (lambda m: m.__setitem__("shape", [3, 160, 192, 2]), "zarr metadata is damaged or unsupported"),
    (lambda m: m.pop("codecs"), "dataset '0' .* array metadata is damaged .*missing 'codecs'"),
])
def test_damaged_array_metadata_is_an_input_error_naming_the_store(tmp_path, change, match):
    store = _zarr(tmp_path)
    _edit(store, "0/zarr.json", change)
    with pytest.raises(ts.InputError, match=match) as info:
        ts.open_image(store)
    assert "in.ome.zarr" in str(info.value)


def test_an_absurd_shape_is_refused_before_the_plan_allocates(tmp_path, model_file):
    store = _zarr(tmp_path)
    _edit(store, "0/zarr.json", lambda m: m.__setitem__("shape", [3, 160, 2**62]))  # was: MemoryError
    with pytest.raises(ts.InvalidTileSize, match=r"in.ome.zarr: image shape .* more than the .* a plan holds"):
        ts.segment(store, model_file, tmp_path / "out.zarr", tile_size=64, progress=False, device="cpu")
    assert not (tmp_path / "out.zarr").exists()


# --------------------------------------------------------------------------- checkpoints and packages


@pytest.mark.parametrize("how", ["system", "exec", "open"])
@pytest.mark.parametrize("container", ["checkpoint", "script-name", "plain"])
def test_a_pickle_that_carries_code_is_refused_without_running_it(tmp_path, model_file, how, container):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    payload = fuzz._Payload(str(marker), how)
    if container == "checkpoint":
        torch.save({"format": "tilesegment.checkpoint", "state_dict": payload}, path)
    elif container == "script-name":  # looks like TorchScript: torch.jit.load's own unpickler
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/constants.pkl", pickle.dumps(payload))
            archive.writestr("archive/data.pkl", pickle.dumps(payload))
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ts.ModelError, match="evil.pt"):
        ts.load_model(path)
    assert not marker.exists()


def test_the_refusal_of_a_code_pickle_names_what_it_would_have_run(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": fuzz._Payload(str(tmp_path / "ran"), "system")}, path)
    with pytest.raises(ts.ModelError, match=r"pickled Python objects \(posix.system\) .* refused unread"):
        ts.load_model(path)


def _checkpoint(tmp_path, change) -> Path:
    path = ts.save_model(small_unet(), tmp_path / "m.pt")
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("change,match", [
    (lambda c: c.pop("architecture"), "names architecture None, which is unknown"),
    (lambda c: c.__setitem__("config", "x"), "invalid config for UNet"),
    (lambda c: c.__setitem__("config", {"bogus": 1}), "invalid config for UNet"),
    (lambda c: c["state_dict"].__setitem__("extra.weight", torch.zeros(1)), "weights do not fit .*extra.weight"),
    (lambda c: c["state_dict"].__setitem__("head.weight", torch.zeros(3, 1)), "weights do not fit .*head.weight"),
])
def test_a_damaged_checkpoint_is_one_model_error_line(tmp_path, capsys, rgb_tiff, change, match):
    path = _checkpoint(tmp_path, change)  # were: KeyError, TypeError, many-line RuntimeError
    with pytest.raises(ts.ModelError, match=match):
        ts.load_model(path)
    assert main(["info", str(rgb_tiff), "--model", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "m.pt" in err[0]


def test_a_damaged_torchscript_lookalike_is_a_model_error(tmp_path):
    path = tmp_path / "s.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/constants.pkl", b"not a pickle")  # was: RuntimeError
    with pytest.raises(ts.ModelError, match="s.pt' looks like TorchScript but cannot be loaded"):
        ts.load_model(path)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    found = _package(tmp_path_factory.mktemp("bioimageio"))
    if found is None:
        pytest.skip("needs bioimageio.spec and bioimageio.core")
    return found


def _damaged_package(package, tmp_path, what, seed=0):
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "package.zip"
    shutil.copyfile(package, path)
    marker = tmp_path / "ran"
    fuzz.mutate_package(np.random.default_rng(seed), path, marker, what)
    return path, marker


@pytest.mark.parametrize("seed", range(4))  # ../evil, ../../evil, /abs, sub/../../evil
def test_a_package_with_a_member_outside_it_is_refused_and_nothing_is_written(package, tmp_path, seed,
                                                                               monkeypatch):
    path, _ = _damaged_package(package, tmp_path / "pkg", "evil-member", seed)
    monkeypatch.chdir(tmp_path / "pkg")
    with pytest.raises(ts.ModelError, match=r"package.zip has a member '.*evil.*' outside the package"):
        ts.load_model(path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["package.zip", "pkg"]


@pytest.mark.parametrize("what,match", [
    ("missing-weights", "names the file 'weights.pt', which the package does not contain"),
    ("sha256", "SHA256 mismatch"),
    ("weights-bytes", "SHA256 mismatch for .*weights.pt"),
    ("weights-pickle", "package.zip: tiny valid unet: cannot load its pytorch_state_dict weights"),
])
def test_a_damaged_package_is_refused_naming_it_and_runs_no_pickled_code(package, tmp_path, what, match):
    path, marker = _damaged_package(package, tmp_path, what)
    with pytest.raises(ts.ModelError, match=match) as info:
        ts.load_model(path)
    assert "package.zip" in str(info.value) and not marker.exists()


def test_a_checkpoint_whose_zip_directory_is_damaged_is_a_model_error(tmp_path):
    path = ts.save_model(small_unet(), tmp_path / "m.pt")
    data = bytearray(path.read_bytes())
    directory = data.rindex(b"PK\x01\x02")  # the last central directory entry: its file name
    data[directory + 46] = 0xB3  # not UTF-8 with the UTF-8 flag set (was: UnicodeDecodeError)
    path.write_bytes(bytes(data))
    with pytest.raises(ts.ModelError, match="cannot read model file .*m.pt"):
        ts.load_model(path)


def test_a_checkpoint_with_damaged_weights_fails_its_checksum_instead_of_giving_nan(tmp_path):
    path = ts.save_model(small_unet(), tmp_path / "m.pt")
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 64)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(path.read_bytes())
    data[start + 8 : start + 12] = b"\xff\xff\xff\x7f"  # a NaN in a tensor (was: loaded, then NaN logits)
    path.write_bytes(bytes(data))
    with pytest.raises(ts.ModelError, match=rf"m.pt' is damaged: its part '{info.filename}' fails its checksum"):
        ts.load_model(path)


def test_library_warnings_about_a_damaged_package_stay_off_stderr(package, tmp_path, rgb_tiff, capsys):
    import warnings

    path, _ = _damaged_package(package, tmp_path, None, seed=1923199435)  # a fuzz case: rdf.yaml cut short
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["info", str(rgb_tiff), "--model", str(path)]) == 2
    assert not [w for w in seen if "bioimageio" in w.filename]  # was: a UserWarning before the error line
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
