"""Segmenting from the napari widget costs the memory of the CLI: peak RSS of both, and Cancel's delay.

Writes a generated JPEG slide (``_common.synthetic_rgb_tiff``, 16384^2 by
default), then, each in a fresh process:

- ``cli``: ``tilesegment segment SLIDE OUT`` (demo model, auto tile and batch);
- ``widget``: a napari viewer (Qt on Xvfb, started here when there is no
  DISPLAY) with the segment widget docked, given the slide by file path, Run
  clicked, the event loop turning until the run finishes. Then a second run
  into a fresh output, cancelled after `--cancel-after` progress reports:
  the delay from the click to the end of the run, in seconds and in batches
  (seconds per batch measured before the click).

Peak RSS is the process's ru_maxrss (the widget's is read right after its
first run, before the cancel). Both peaks include the imports: napari and Qt
add their libraries to the widget's. So each child also reads its RSS just
before the run (after importing torch, and for the widget after creating the
viewer): ``run_rss_mb`` = peak - that baseline, what the run itself costs.
Output: results/napari_memory.{csv,json,png}.

    python benchmarks/napari_memory.py [--size 16384] [--slides DIR] [--cancel-after 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, synthetic_rgb_tiff, write_rows  # noqa: E402

RSS = """
def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
"""

CLI = RSS + """
import json, resource, sys, time
import torch
from tilesegment.cli import main
baseline = rss_mb()
start = time.perf_counter()
code = main(["segment", sys.argv[1], sys.argv[2], "--quiet", "--overwrite"])
print(json.dumps({"exit": code, "seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "baseline_rss_mb": baseline}))
"""

WIDGET = RSS + """
import json, resource, sys, time
from pathlib import Path
import napari
from qtpy.QtWidgets import QApplication
from tilesegment.napari._widget import SegmentWidget

slide, folder, cancel_after = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
viewer = napari.Viewer(show=False)
w = SegmentWidget(viewer)
viewer.window.add_dock_widget(w)
app = QApplication.instance()
import torch
baseline = rss_mb()
errors, failed = [], w._failed
w._failed = lambda exc: (errors.append(f"{type(exc).__name__}: {exc}"), failed(exc))

def wait():
    while not w.run_button.enabled:
        app.processEvents()
        time.sleep(0.005)

w.file.value, w.folder.value, w.overwrite.value = slide, folder, True
start = time.perf_counter()
w.run()
wait()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if not w.added:
    sys.exit(f"the widget's run failed: {errors}")
layer = w.added[0]
lazy = type(layer.data[0]).__module__.split(".")[0]

# Cancel: a fresh output, the click after `cancel_after` reports (one per batch on the CPU).
w.folder.value = folder / "cancel"
seen, show, clicked = [], w._progress, {}
def progress(report):
    seen.append((time.perf_counter(), report.done))
    if len(seen) == cancel_after:
        clicked["at"], clicked["done"] = time.perf_counter(), report.done
        w.cancel()
    show(report)
w._progress = progress
w.run()
wait()
end = time.perf_counter()
per_batch = (seen[cancel_after - 1][0] - seen[0][0]) / max(1, cancel_after - 1)
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "baseline_rss_mb": baseline, "layers": len(w.added), "lazy": lazy,
                  "multiscale_levels": len(layer.data), "status": w.status.value,
                  "cancel_delay_s": end - clicked["at"], "seconds_per_batch": per_batch,
                  "tiles_after_cancel": seen[-1][1] - clicked["done"]}))
"""


def _child(code: str, *args: str, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--slides", type=Path, default=None, help="keep the generated slide here and reuse it")
    parser.add_argument("--cancel-after", type=int, default=6)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="napari_memory_"))
    folder = args.slides or work
    folder.mkdir(parents=True, exist_ok=True)
    slide = folder / f"slide_{args.size}.tif"
    if not slide.exists():
        synthetic_rgb_tiff(slide, args.size)
    env = dict(os.environ)
    xvfb = None
    if not env.get("DISPLAY"):
        xvfb = subprocess.Popen(["Xvfb", ":97", "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env["DISPLAY"] = ":97"
        time.sleep(1)
    try:
        cli = _child(CLI, str(slide), str(work / "cli.zarr"), env=env)
        widget = _child(WIDGET, str(slide), str(work / "widget"), str(args.cancel_after), env=env)
    finally:
        if xvfb is not None:
            xvfb.terminate()
    import napari
    import qtpy

    rows = [{"run": run, "size": args.size, "seconds": round(r["seconds"], 1),
             "peak_rss_mb": round(r["peak_rss_mb"]), "baseline_rss_mb": round(r["baseline_rss_mb"]),
             "run_rss_mb": round(r["peak_rss_mb"] - r["baseline_rss_mb"])}
            for run, r in (("cli", cli), ("widget", widget))]
    summary = {
        "rss_ratio_widget_to_cli": round(widget["peak_rss_mb"] / cli["peak_rss_mb"], 3),
        "run_rss_ratio_widget_to_cli": round(rows[1]["run_rss_mb"] / rows[0]["run_rss_mb"], 3),
        "result_layer": f"{widget['lazy']} arrays, {widget['multiscale_levels']} levels, {widget['layers']} layer(s)",
        "cancel_delay_s": round(widget["cancel_delay_s"], 2),
        "seconds_per_batch": round(widget["seconds_per_batch"], 2),
        "cancel_delay_batches": round(widget["cancel_delay_s"] / widget["seconds_per_batch"], 2),
        "tiles_after_cancel": widget["tiles_after_cancel"],
        "napari": napari.__version__, "qt": f"{qtpy.API_NAME} {qtpy.QT_VERSION}",
    }
    csv_path, json_path = write_rows("napari_memory", rows)
    data = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**data, "summary": summary}, indent=2))
    _plot(rows, summary, RESULTS / "napari_memory.png")
    print(json.dumps(rows, indent=1), json.dumps(summary, indent=1))


def _plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.4))
    ax.barh([r["run"] for r in rows], [r["peak_rss_mb"] for r in rows], color=["tab:blue", "tab:orange"])
    ax.set_xlabel("peak RSS (MB), lower is better")
    ax.set_title(f"{rows[0]['size']}² JPEG slide, demo model: widget / CLI = {summary['rss_ratio_widget_to_cli']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
