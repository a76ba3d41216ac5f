"""A/B: one benchmark script on two checkouts of the code, interleaved, medians side by side.

    git worktree add /tmp/before <commit>
    python benchmarks/ab.py --before /tmp/before --rounds 3 --name ab_host_ceiling -- host_ceiling.py --size 4096
    python benchmarks/ab.py --before /tmp/before --name ab_pipeline -- pipeline_efficiency.py --no-first-run

Each round runs the script once on the old checkout (``--before``, its own
copy of the script and package) and once on this one, alternating, so the
noise of a shared machine falls on both alike. The script must take
``--name`` and write ``results/<name>.json`` with a ``rows`` list (every
script here does). Rows are matched by their text fields (stage, source...);
each number is the median over the rounds. Output: results/<name>.{csv,json},
one row per matched row and measured number (settings, the same in every
run, are left out): before, after, and after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from _common import write_rows

HERE = Path(__file__).resolve().parent


def run(tree: Path, script: str, args: list[str], name: str) -> list[dict]:
    """Run ``tree``'s copy of `script` with ``tree``'s package; return its result rows."""
    bench = tree / "benchmarks"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, str(bench / script), *args, "--name", name], cwd=bench, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    path = bench / "results" / f"{name}.json"
    rows = json.loads(path.read_text())["rows"]
    for suffix in (".json", ".csv", ".png"):  # the rounds are kept only in the summary
        path.with_suffix(suffix).unlink(missing_ok=True)
    return rows


def key(row: dict) -> tuple:
    return tuple((k, v) for k, v in row.items() if isinstance(v, str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the old code")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", required=True, help="results file stem")
    parser.add_argument("script", help="benchmark script in benchmarks/, e.g. host_ceiling.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script (after --)")
    opts = parser.parse_args()
    args = [a for a in opts.args if a != "--"]
    trees = {"before": opts.before.resolve(), "after": HERE.parent}
    seen: dict[str, dict[tuple, list[dict]]] = {"before": {}, "after": {}}
    for r in range(opts.rounds):
        for label, tree in trees.items():
            for row in run(tree, opts.script, args, f"_ab_{label}_{r}"):
                seen[label].setdefault(key(row), []).append(row)
            print(f"round {r + 1}/{opts.rounds}: {label} done", file=sys.stderr)
    rows = []
    for k, before_rows in seen["before"].items():
        after_rows = seen["after"].get(k)
        if not after_rows:
            continue
        for field, value in before_rows[0].items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            b = [x[field] for x in before_rows if isinstance(x.get(field), (int, float))]
            a = [x[field] for x in after_rows if isinstance(x.get(field), (int, float))]
            if not a or not b or len(set(a) | set(b)) == 1:
                continue  # a setting (size, batch), not a measurement
            mb, ma = float(np.median(b)), float(np.median(a))
            rows.append({**dict(k), "field": field, "before": round(mb, 4), "after": round(ma, 4),
                         "after_over_before": round(ma / mb, 3) if mb else None, "rounds": len(a)})
    write_rows(opts.name, rows)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
