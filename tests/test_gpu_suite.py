"""The GPU suite (benchmarks/gpu/) runs end to end at toy sizes on the CPU, so it cannot rot
between the rare runs on a GPU machine: every stage either measures or says why it cannot."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"environment", "cuda_tests", "exactness", "model_only", "model_compiled", "end_to_end",
          "host_ceiling", "jpeg_decode", "onnx"}


def skipped_parts(figures: dict) -> list[str]:
    """The reasons given by the parts of a stage that could not run here."""
    found = []
    for value in figures.values():
        if isinstance(value, dict):
            found += [value["skipped"]] if "skipped" in value else skipped_parts(value)
    return found


def test_dry_run_measures_every_stage_or_says_why_not(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-logs.tar.gz", "gpu.json"]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["dry_run"] and set(result["stages"]) == STAGES
    for name, record in result["stages"].items():
        assert record["status"] in ("ok", "skipped"), (name, record)
        if record["status"] == "skipped":
            assert record["reason"], name
        else:
            assert record["figures"], name
            assert all(reason for reason in skipped_parts(record["figures"])), name
    assert result["stages"]["exactness"]["figures"]["fp32_exact"] is True
    assert result["stages"]["cuda_tests"]["figures"]["failures"] == 0
    assert all(f"{name}" in proc.stdout for name in STAGES)  # the table, printed last
