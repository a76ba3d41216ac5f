"""Kill `tilesegment segment` runs anywhere, resume them, and compare with an uninterrupted run.

A test harness (used by ``tests/test_chaos.py`` and ``benchmarks/chaos.py``),
not product code: no hook is built into the package. Each run is a child
process forked from a warm parent (torch, numba and zarr imported and
compiled once), running ``tilesegment.cli.main(argv)`` as the command line
would. A *kill point* replaces one function of the package, or of a library
it calls, with a wrapper that counts calls across all threads and sends the
process SIGKILL at the n-th one, before or after the real call: a
deterministic way to stop a run in each phase (tile reads, chunk writes,
the manifest, the pyramid, the metadata, the objects pass, the table, the
GeoJSON). A delay instead kills the child from the parent after that many
seconds, wherever it is.

After a kill the command is rerun with ``--resume``, which is what a user
types after any stop, until a run exits 0; the folder it wrote must then
hold exactly the files, byte for byte, of a run that was never stopped:
every chunk of every array and pyramid level, every ``zarr.json``, the
objects table and the GeoJSON, and nothing else (no manifest, no temporary
file).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

#: Where each kill point sits: phase -> (target, kill after the call returns?).
#: A target is ``module:attribute.path``; functions imported by name into another
#: module are patched where they are looked up.
TARGETS: dict[str, tuple[str, bool]] = {
    "manifest start": ("tilesegment.io.manifest:Manifest.start", True),
    "tile read": ("tilesegment.tiler:Tiler._read_tile", False),
    "stitch": ("tilesegment.stitch:Stitcher.add", True),
    "chunk write": ("tilesegment.io.sinks:ZarrSink._write", False),
    "block marked": ("tilesegment.io.manifest:Manifest.mark_done", False),
    "store write": ("zarr.storage._local:_put", True),
    "pyramid level": ("tilesegment.io.sinks:ZarrSink._downsample", True),
    "metadata": ("tilesegment.io.sinks:write_ome", True),
    "file removal": ("os:unlink", True),
    "folder removal": ("os:rmdir", True),
    "manifest finish": ("tilesegment.io.manifest:Manifest.finish", False),
    "objects labels/": ("tilesegment.objects.passes:_labels_group", True),
    "objects measure": ("tilesegment.objects.passes:_measure_chunks", True),
    "objects write": ("tilesegment.objects.passes:_write_chunks", True),
    "objects finish": ("tilesegment.objects:finish_sink", False),
    "objects source": ("tilesegment.objects.passes:write_ome", True),
    "swap rename": ("pathlib:Path.rename", True),
    "table": ("pandas:DataFrame.to_csv", True),
    "geojson": ("gzip:GzipFile.write", True),
    "final rename": ("pathlib:Path.replace", False),
}


@dataclass(frozen=True)
class Kill:
    """Stop a run: at the `nth` call of `phase`'s target, or `delay` seconds after it starts."""

    phase: str = ""
    nth: int = 1
    delay: Optional[float] = None

    def __str__(self) -> str:
        return f"after {self.delay:.2f} s" if self.delay is not None else f"{self.phase} #{self.nth}"


@dataclass
class Outcome:
    """What one scenario did: the kills that landed, the runs, and whether the result matches."""

    kills: list = field(default_factory=list)  # str(Kill) of each kill that stopped a run
    missed: list = field(default_factory=list)  # kill points the run finished before reaching
    runs: int = 0
    codes: list = field(default_factory=list)
    differences: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def identical(self) -> bool:
        return not self.differences and self.codes[-1:] == [0]


def _resolve(target: str):
    module, path = target.split(":")
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return owner, name


def _install(kill: Optional[Kill], counts: Optional[dict]) -> None:
    """In the child: wrap the kill point's target (or, with `counts`, every target, to count calls)."""
    lock = threading.Lock()
    phases = list(TARGETS) if counts is not None else ([kill.phase] if kill is not None and kill.phase else [])
    for phase in phases:
        target, after = TARGETS[phase]
        owner, name = _resolve(target)
        original = getattr(owner, name)
        seen = [0]

        def wrapper(*args, _original=original, _phase=phase, _after=after, _seen=seen, **kwargs):
            with lock:
                _seen[0] += 1
                n = _seen[0]
                if counts is not None:
                    counts[_phase] = n
            die = counts is None and n == kill.nth
            if die and not _after:
                os.kill(os.getpid(), signal.SIGKILL)
            result = _original(*args, **kwargs)
            if die:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        functools.update_wrapper(wrapper, original)
        setattr(owner, name, wrapper)


def run(argv: Sequence[str], kill: Optional[Kill] = None, log: Optional[Path] = None,
        counts: Optional[Path] = None, timeout: float = 120) -> int:
    """Run ``tilesegment`` with `argv` in a forked child; return its exit status (-9: killed).

    A child still running after `timeout` seconds is killed and reported as a hang (-1).
    """
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller (pytest)
        code = 99
        try:
            if log is not None:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
            tally: Optional[dict] = {} if counts is not None else None
            _install(kill, tally)
            from tilesegment.cli import main

            code = main(list(argv))
            if counts is not None:
                counts.write_text(json.dumps(tally))
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    start, hung = time.monotonic(), False
    delay = kill.delay if kill is not None else None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -1 if hung else os.waitstatus_to_exitcode(status)
        elapsed = time.monotonic() - start
        if delay is not None and elapsed >= delay:
            os.kill(pid, signal.SIGKILL)
            delay = None
        elif elapsed > timeout and not hung:
            os.kill(pid, signal.SIGKILL)  # a hang: the caller sees -1
            hung = True
        time.sleep(0.002)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def differences(got: dict[str, bytes], want: dict[str, bytes]) -> list[str]:
    """One line per file that is missing, extra, or has other bytes."""
    lines = [f"missing {k}" for k in sorted(set(want) - set(got))]
    lines += [f"extra {k}" for k in sorted(set(got) - set(want))]
    lines += [f"differs {k}" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    return lines


@dataclass(frozen=True)
class Case:
    """The command under test: inputs in one folder, outputs in a fresh folder per scenario."""

    argv: Callable[[Path], list]  # output folder -> argv
    reference: dict  # tree() of an uninterrupted run's folder

    @classmethod
    def make(cls, argv: Callable[[Path], list], folder: Path, in_process: bool = False) -> "Case":
        """Run the command once, uninterrupted, into `folder`; with `in_process`, in this process,
        which warms it (imports, numba's compiled kernels, torch) for the children it forks:
        each then runs in about a third of the time of a cold process."""
        folder.mkdir(parents=True)
        if in_process:
            from tilesegment.cli import main

            assert main(argv(folder)) == 0
        else:
            log = folder.parent / f"{folder.name}.log"
            assert run(argv(folder), log=log) == 0, log.read_text()
        return cls(argv, tree(folder))


def scenario(case: Case, kills: Sequence[Kill], folder: Path, max_runs: int = 8) -> Outcome:
    """Run the case with each kill in turn (a kill that does not land is skipped), then with
    ``--resume`` until a run exits 0; compare the folder with the reference."""
    start = time.monotonic()
    folder.mkdir(parents=True)
    log = folder.parent / f"{folder.name}.log"
    out = Outcome()
    argv = case.argv(folder)
    pending = list(kills)
    while out.runs < max_runs:
        kill = pending.pop(0) if pending else None
        code = run(argv + (["--resume"] if out.runs else []), kill, log)
        out.runs += 1
        out.codes.append(code)
        if code == -signal.SIGKILL and kill is not None:
            out.kills.append(str(kill))
            continue
        if kill is not None and kill.delay is None:
            out.missed.append(str(kill))
        if code == 0 and not pending:
            break
        if code != 0:
            break  # a resume that fails is a finding: stop here, the log says why
    out.differences = differences(tree(folder), case.reference)
    if out.codes[-1:] != [0]:
        out.differences.insert(0, f"last run exited {out.codes[-1]}: "
                                  + " | ".join(log.read_text().strip().splitlines()[-3:]))
    out.seconds = time.monotonic() - start
    return out


def count_calls(case: Case, folder: Path) -> dict[str, int]:
    """How often an uninterrupted run calls each kill point's target."""
    folder.mkdir(parents=True)
    counts = folder.parent / f"{folder.name}.counts.json"
    assert run(case.argv(folder), log=folder.parent / f"{folder.name}.log", counts=counts) == 0
    shutil.rmtree(folder)
    return json.loads(counts.read_text())


def random_kills(rng: random.Random, calls: dict[str, int], seconds: float, n: int) -> list[Kill]:
    """`n` kills in a row: a random phase at a random call, or (one in four) a random moment.

    A resumed run does less than a full one, so the k-th kill draws from the first 1/k of
    the calls (and of the time) of an uninterrupted run, where it is likelier to land.
    """
    phases = sorted(p for p, c in calls.items() if c)
    kills = []
    for k in range(1, n + 1):
        if rng.random() < 0.25:
            kills.append(Kill(delay=rng.uniform(0.05, seconds / k)))
        else:
            phase = rng.choice(phases)
            kills.append(Kill(phase, rng.randint(1, max(1, calls[phase] // k))))
    return kills


def slide(path: Path, shape=(2100, 64), seed: int = 0) -> Path:
    """A small tiled RGB TIFF, tall enough for two pyramid levels (2100 -> 1050 -> 525)."""
    import numpy as np
    import tifffile

    image = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb")
    return path


def warm_parent() -> None:
    """One torch thread: forked children then start no OpenMP pool the parent left behind."""
    import torch

    torch.set_num_threads(1)
