"""Kill `segment --objects` runs at random moments, resume them, check the files are identical.

    python benchmarks/chaos.py [--seeds 40] [--kills 3] [--batch-every 4]

The seed sweep of `tests/test_chaos.py`, with the same harness
(`tests/_chaos.py`): per seed, one to `--kills` SIGKILLs in a row, each at a
random call of a random phase (tile read, chunk write, block marker, store
write, pyramid level, metadata, manifest removal, objects pass, table,
GeoJSON, renames) or, one in four, at a random moment of the run; after
each the command is rerun with ``--resume`` until it exits 0, and the output
folder must hold exactly the files, byte for byte, of an uninterrupted run.
Every `--batch-every`-th seed runs a batch of two slides into a folder
instead. Writes results/chaos.{csv,json}: per seed the kills that landed,
the runs, and whether the result was identical.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the harness and the tiny model of the tests
os.environ.setdefault("OMP_NUM_THREADS", "1")

import _chaos as chaos  # noqa: E402
from _common import write_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=40, help="scenarios to run (default: 40)")
    parser.add_argument("--kills", type=int, default=3, help="at most this many kills in a row (default: 3)")
    parser.add_argument("--batch-every", type=int, default=4, help="every N-th seed is a batch run (default: 4)")
    args = parser.parse_args()

    import tilesegment as ts
    from conftest import small_unet

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = root / "in"
        inputs.mkdir()
        a = chaos.slide(inputs / "a.tif")
        b = chaos.slide(inputs / "b.tif", (300, 64), seed=1)
        model = ts.save_model(small_unet(3, 3, base=4, depth=2, seed=3), inputs / "m.pt")
        common = ["--model", str(model), "--tile-size", "128", "--chunk-size", "128", "--objects", "--device",
                  "cpu", "--quiet"]
        chaos.warm_parent()
        start = time.perf_counter()
        single = chaos.Case.make(lambda out: ["segment", str(a), str(out / "a.zarr"), *common], root / "single",
                                 in_process=True)
        full = time.perf_counter() - start
        batch = chaos.Case.make(lambda out: ["segment", str(a), str(b), str(out), *common], root / "batch")
        calls = {"single": chaos.count_calls(single, root / "count-single"),
                 "batch": chaos.count_calls(batch, root / "count-batch")}
        rows = []
        for seed in range(args.seeds):
            rng = random.Random(seed)
            kind = "batch" if args.batch_every and seed % args.batch_every == args.batch_every - 1 else "single"
            case = batch if kind == "batch" else single
            kills = chaos.random_kills(rng, calls[kind], full * (2 if kind == "batch" else 1),
                                       rng.randint(1, args.kills))
            outcome = chaos.scenario(case, kills, root / f"seed-{seed}")
            rows.append({"seed": seed, "kind": kind, "kills_tried": len(kills), "kills": len(outcome.kills),
                         "kill_points": "; ".join(outcome.kills), "missed": "; ".join(outcome.missed),
                         "runs": outcome.runs, "resumes": outcome.runs - 1, "exit_codes": " ".join(map(str, outcome.codes)),
                         "identical": outcome.identical, "differences": "; ".join(outcome.differences[:5]),
                         "seconds": round(outcome.seconds, 2)})
            row = rows[-1]
            print(f"seed {seed:3d} {kind:6} kills {row['kills']} ({row['kill_points'] or '-'}), runs {row['runs']}, "
                  f"identical {'yes' if row['identical'] else 'NO: ' + row['differences']}", flush=True)
    paths = write_rows("chaos", rows)
    kills = sum(r["kills"] for r in rows)
    same = sum(r["identical"] for r in rows)
    print(f"{len(rows)} scenarios, {kills} kills, {sum(r['resumes'] for r in rows)} resumed runs: "
          f"{same} of {len(rows)} identical to an uninterrupted run; wrote {', '.join(map(str, paths))}")


if __name__ == "__main__":
    main()
