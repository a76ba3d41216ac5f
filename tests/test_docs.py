"""Every example in README.md and docs/*.md runs as written.

Each page runs top to bottom in a fresh folder, its ```python blocks in one
namespace and its ```sh blocks through bash, with small generated files
standing in for the slides and volumes the pages name (`slide.svs`,
`volume.ome.zarr`, `stack.ome.tif`). Synopses (blocks with ``[--flag]``) are
checked against the real argument parser, and output samples against a real
run. What cannot run here is listed in `SKIP`, each block with its reason.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))

#: (page, a line of the block): why the block cannot run in this test.
SKIP = {
    ("README.md", "python -m venv .venv"): "installs the project; .ci/run does exactly this before the tests",
    ("README.md", "python -m pytest -q"): "the test suite itself, which CI runs",
    ("docs/benchmarks.md", "python benchmarks/ab.py"):
        "runs a benchmark several times on two checkouts (minutes); benchmarks measure, tests assert",
    ("docs/distributed.md", 'Client("tcp://scheduler:8786")'):
        "needs a dask scheduler at tcp://scheduler:8786 (tests/test_distributed.py runs the same on a LocalCluster)",
    ("docs/distributed.md", "dask worker tcp://"): "starts a dask scheduler and GPU workers",
    ("docs/distributed.md", "SSHCluster("): "needs SSH access to other machines",
    ("docs/distributed.md", "SLURMCluster("): "needs a SLURM cluster",
    ("docs/gpu.md", "bash benchmarks/gpu/fetch-wheels.sh"): "downloads wheels (needs the network)",
    ("docs/gpu.md", "OUT=/path/to/results bash benchmarks/gpu/run.sh"): "needs a GPU machine",
    ("docs/gpu.md", "bash benchmarks/gpu/run.sh --dry-run"):
        "runs in the repository, not a page's folder; tests/test_gpu_suite.py runs exactly this",
    ("docs/models.md", 'pip install -e ".[onnx]"'): "installs packages (the test extra has them)",
    ("docs/models.md", 'pip install -e ".[bioimageio]"'):
        "needs a bioimage.io package (tests/test_bioimageio.py builds one and runs the same through the CLI)",
    ("docs/napari.md", 'pip install "tilesegment[napari]" pyqt5'): "installs packages (the test extra has them)",
    ("docs/napari.md", "napari --plugin tilesegment slide.zarr"):
        "opens a napari window (tests/test_napari_viewer.py opens the same in a viewer on Xvfb)",
    ("docs/napari.md", "napari --plugin tilesegment slide.svs"):
        "opens a napari window (tests/test_napari.py reads a slide through the same reader)",
    ("docs/objects.md", 'pip install "tilesegment[napari]" pyqt5'):
        "installs packages, and opens a napari window (tests/test_napari_viewer.py does the same on Xvfb)",
    ("docs/remote.md", 'pip install -e ".[remote]"'):
        "needs the network (tests/test_remote.py runs the same against a local S3 and HTTP server)",
    ("docs/remote.md", '"endpoint_url": "https://minio.example.org"'):
        "needs the network (tests/test_remote.py runs the same against a local S3 and HTTP server)",
}


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str

    @property
    def first(self) -> str:
        return self.code.splitlines()[0] if self.code.strip() else ""

    def skipped(self) -> bool:
        return any(page == self.page and line in self.code for page, line in SKIP)

    @property
    def is_synopsis(self) -> bool:
        return bool(re.search(r"^tilesegment \w+.*\[--", self.code, re.M))


def blocks(page: str) -> list[Block]:
    """The fenced blocks of `page`, in order."""
    text = (ROOT / page).read_text()
    found = []
    for m in re.finditer(r"^([ \t]*)```(\w*)\n(.*?)^\1```", text, re.S | re.M):
        code = textwrap.dedent(m.group(3))  # a block inside a list item is indented
        found.append(Block(page, text.count("\n", 0, m.start()) + 1, m.group(2), code))
    return found


def _stand_ins(folder: Path) -> None:
    """Small files under the names the pages use."""
    import tifffile
    import zarr

    from tilesegment.demo import write_tiff_pyramid
    from tilesegment.he import synthetic_slide

    rgb, _ = synthetic_slide((512, 512), seed=7)
    write_tiff_pyramid(folder / "slide.svs", rgb, pixel_size=0.5)
    rng = np.random.default_rng(0)
    volume = (rng.random((12, 64, 64)) * 255).astype(np.uint8)
    group = zarr.open_group(folder / "volume.ome.zarr", mode="w")
    group.create_array("0", data=volume, chunks=(12, 64, 64))
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 0.5, 0.5]}]}]}]}
    tifffile.imwrite(folder / "stack.ome.tif", volume[:4], ome=True, metadata={"axes": "ZYX"})
    small, _ = synthetic_slide((256, 256), seed=8)  # the slides of the batch examples
    (folder / "slides").mkdir()
    for name in ("slides/case-1.svs", "slides/case-2.svs", "a.svs", "b.ndpi", "c.tif"):
        write_tiff_pyramid(folder / name, small, pixel_size=0.5)


def _parser_flags() -> dict[str, set[str]]:
    """Every --flag of each verb of the real CLI."""
    from tilesegment.cli import _parser

    parser = _parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {verb: {o for a in sub._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
            for verb, sub in verbs.choices.items()}


def check_synopsis(block: Block) -> None:
    """The flags a synopsis lists for a verb are the parser's, each once."""
    flags = _parser_flags()
    for verb, body in re.findall(r"^tilesegment (\w+)(.*?)(?=^tilesegment |\Z)", block.code, re.S | re.M):
        if verb not in flags:
            continue
        listed = re.findall(r"(--[a-z][a-z0-9-]*)", body)
        dupes = {f for f in listed if listed.count(f) > 1}
        assert not dupes, f"{block.page}:{block.line}: {verb} lists {sorted(dupes)} twice"
        if block.page == "docs/cli.md":  # the full synopsis: every flag
            assert set(listed) == flags[verb] - {"--debug"}, (
                f"{block.page}:{block.line}: {verb} synopsis differs from --help: missing "
                f"{sorted(flags[verb] - set(listed) - {'--debug'})}, unknown {sorted(set(listed) - flags[verb])}")
        else:
            assert set(listed) <= flags[verb], f"{block.page}:{block.line}: unknown {sorted(set(listed) - flags[verb])}"


def _line_pattern(line: str) -> str:
    """A regex for one line of an output sample: numbers and names may differ, the words may not."""
    words = [r"\S+" if re.search(r"\d", word) or "." in word else re.escape(word) for word in line.split()]
    return r"^" + r"\s+".join(words) + r"\s*$"


def check_sample(block: Block, folder: Path, env: dict) -> None:
    """Every line of an output sample is a line of a real run, word for word but for numbers and names."""
    command = SAMPLES[(block.page, block.first)]
    run = subprocess.run(command, shell=True, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    printed = "\n".join(part.strip() for part in re.split(r"[\r\n]+", run.stderr))  # progress bars use \r
    for line in block.code.strip().splitlines():
        assert re.search(_line_pattern(line), printed, re.M), (
            f"{block.page}:{block.line}: `{line}` is not what `{command}` prints:\n{printed}")


#: Output samples: (page, first line) -> the command whose stderr they show.
SAMPLES = {
    ("docs/cli.md", "input    slide.svs: 2967 x 2220 px, 3 channel(s), uint8"):
        "tilesegment segment slide.svs sample.zarr --tile-size 512",
    ("docs/cli.md", "input    volume.ome.zarr: z 512 x y 2048 x x 2048 px, 1 channel(s), uint8"):
        "python -c \"import tilesegment as ts; ts.save_model(ts.UNet(1, 2, base_channels=2, depth=1, ndim=3, pooling=[(1, 2, 2)]), "
        "'net3d.pt')\" && tilesegment segment volume.ome.zarr sample3d.zarr --model net3d.pt --tile-size 4,32,32",
}


def run_sh(block: Block, folder: Path, env: dict) -> None:
    # An install would change the environment the rest of the suite runs in.
    assert not re.search(r"\b(pip|apt-get|conda) install\b", block.code), (
        f"{block.page}:{block.line} installs packages; list it in SKIP with the reason")
    script = "set -euo pipefail\n" + block.code
    run = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{block.page}:{block.line} failed:\n{block.code}\n{run.stdout}\n{run.stderr}"


@pytest.mark.parametrize("page", PAGES)
def test_every_example_of_the_page_runs_as_written(page, tmp_path, monkeypatch):
    page_blocks = blocks(page)
    if not page_blocks:
        pytest.skip("no examples")
    _stand_ins(tmp_path)
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    monkeypatch.syspath_prepend(str(tmp_path))  # modules a page writes (factories) import
    namespace: dict = {"__name__": "__docs__"}
    for block in page_blocks:
        if block.skipped():
            continue
        if block.is_synopsis:
            check_synopsis(block)
        elif (page, block.first) in SAMPLES:
            check_sample(block, tmp_path, env)
        elif block.lang == "python":
            exec(compile(block.code, f"{page}:{block.line}", "exec"), namespace)
        elif block.lang == "sh":
            run_sh(block, tmp_path, env)
        # Other blocks (diagrams, error lines) are prose.


def test_the_skip_list_names_blocks_that_exist():
    every = {page: blocks(page) for page in PAGES}
    stale = [key for key in SKIP if not any(key[1] in b.code for b in every.get(key[0], []))]
    assert not stale, stale
    firsts = {(page, b.first) for page in PAGES for b in every[page]}
    assert set(SAMPLES) <= firsts, sorted(set(SAMPLES) - firsts)


def test_every_cli_synopsis_matches_the_parser():
    for page in PAGES:
        for block in blocks(page):
            if block.is_synopsis:
                check_synopsis(block)
