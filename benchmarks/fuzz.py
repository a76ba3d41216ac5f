"""Damaged and hostile inputs at scale: many seeded mutations through the CLI, counted by outcome.

    python benchmarks/fuzz.py [--count 2000] [--seeds 0,1,2,3] [--kinds tiff-jpeg,zarr-v3,...]

The same cases as tests/test_fuzz.py (`tilesegment._fuzz`), over more seeds:
each damages a copy of a valid input (TIFF family, the shared SVS when
present, OME-Zarr, a checkpoint, a bioimage.io package when bioimageio is
installed) and runs ``segment`` or ``info`` on it. Writes
results/fuzz.{csv,json}: one row per (seed, input kind) with the count of each
outcome, plus a row per seed for all kinds, and prints the cases that broke
the contract (a traceback, the CLI's catch-all line, an error line without
the file's name, a hang, a crash signal, a stray file). It never asserts;
tests/test_fuzz.py does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import write_rows
from tilesegment import _fuzz as fuzz

OUTCOMES = ("ok", "skipped", "exit1", "exit2", *fuzz.BAD)


def _package(folder: Path):
    """A valid bioimage.io package built as the tests build one, or None without bioimageio."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
        from test_bioimageio import build_package
    except Exception:
        return None
    return build_package(folder)[0]


def _row(seed, kind, results, seconds=None) -> dict:
    counts = fuzz.count_outcomes(results)
    row = {"seed": seed, "kind": kind, "cases": len(results), **{o: counts.get(o, 0) for o in OUTCOMES}}
    row["bad"] = sum(counts.get(o, 0) for o in fuzz.BAD)
    row["seconds"] = round(seconds, 1) if seconds is not None else ""
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="cases in all, split over the seeds")
    parser.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds")
    parser.add_argument("--kinds", default=",".join(fuzz.KINDS), help="input kinds (see tilesegment._fuzz.KINDS)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds a case may take")
    parser.add_argument("--keep", default=None, metavar="DIR", help="keep the inputs of failed cases here")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = args.kinds.split(",")
    rows, bad = [], []
    with tempfile.TemporaryDirectory(prefix="tilesegment-fuzz-") as tmp:
        tmp = Path(tmp)
        inputs = fuzz.make_inputs(tmp / "inputs", wanted, package=_package(tmp / "package")
                                  if "bioimageio" in wanted else None)
        kinds = [k for k in wanted if k in inputs]
        work = Path(args.keep) if args.keep else tmp / "work"
        for i, seed in enumerate(seeds):
            count = args.count // len(seeds) + (i < args.count % len(seeds))
            start = time.perf_counter()
            results = fuzz.run_cases(fuzz.plan_cases(seed, count, kinds), inputs, work / f"seed-{seed}",
                                     timeout=args.timeout, keep=args.keep is not None)
            seconds = time.perf_counter() - start
            rows += [_row(seed, kind, [r for r in results if r.kind == kind]) for kind in kinds]
            rows.append(_row(seed, "all", results, seconds))
            bad += [(seed, r) for r in results if r.outcome in fuzz.BAD]
            print(f"seed {seed}: {count} cases in {seconds:.0f} s: {fuzz.count_outcomes(results)}", flush=True)
    total = {o: sum(r[o] for r in rows if r["kind"] == "all") for o in ("cases", *OUTCOMES)}
    print(f"all: {total}")
    for seed, r in bad[:20]:
        print(f"  seed {seed} case {r.index} {r.kind}: {r.mutation} | {r.command} -> {r.outcome}: {r.message[:300]}")
    for path in write_rows("fuzz", rows):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
