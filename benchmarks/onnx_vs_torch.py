"""CPU speed of an ONNX export (onnxruntime) next to the same network in torch.

    python benchmarks/onnx_vs_torch.py [--slide PATH] [--repeats 3]

For the bundled demo U-Net (base 8, depth 4) and a wider one (base 32,
depth 4): model-only seconds per 700x700 input (tile 512) in torch and in
onnxruntime (best of `--repeats`, run alternately, same thread count), and end to end on the
shared H&E slide (demo model only; logits, tile 512, in memory) with the maximum relative
difference of the logits. Also the one-off costs: export, loading with the
geometry in the file, and loading a plain export whose geometry is probed.
Writes results/onnx_vs_torch.{csv,json,png}.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import tilesegment as ts
from _common import RESULTS, write_rows
from tilesegment.models.onnx import OnnxModel

SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "small_HE.svs"


def best_of(fns, repeats: int) -> list[float]:
    """Best time of each function, run alternately so that load from other processes
    (this is a shared machine) falls on both alike."""
    for fn in fns:
        fn()  # warm-up (oneDNN / onnxruntime kernel selection)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [min(t) for t in times]


def plain_export(net, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (torch.zeros(1, 3, *net.geometry.min_input),), str(path), dynamo=False,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", default=str(SLIDE))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {"demo (base 8)": ts.load_model("demo"),
              "base 32, depth 4": ts.UNet(3, 3, base_channels=32, depth=4).eval()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, net in models.items():
            path = Path(tmp) / "net.onnx"
            start = time.perf_counter()
            ts.save_model(net, path, format="onnx")
            export_s = time.perf_counter() - start
            start = time.perf_counter()
            onnx_model = ts.load_model(path)
            load_s = time.perf_counter() - start
            start = time.perf_counter()
            probed = OnnxModel(plain_export(net, Path(tmp) / "plain.onnx"))
            probe_s = time.perf_counter() - start
            assert probed.geometry == net.geometry
            x = torch.rand(1, 3, 700, 700)
            with torch.inference_mode():
                torch_x = x.contiguous(memory_format=torch.channels_last)
                torch_net = net.to(memory_format=torch.channels_last)  # as the executor runs it
                torch_s, onnx_s = best_of([lambda: torch_net(torch_x), lambda: onnx_model(x)], args.repeats)
                diff = float((onnx_model(x) - net(x)).abs().max() / net(x).abs().max())
            row = {"model": name, "threads": torch.get_num_threads(), "input": 700,
                   "torch_s_per_tile": round(torch_s, 4), "onnx_s_per_tile": round(onnx_s, 4),
                   "onnx_over_torch": round(onnx_s / torch_s, 3), "max_rel_diff_tile": diff,
                   "export_s": round(export_s, 2), "load_with_metadata_s": round(load_s, 3),
                   "load_with_probe_s": round(probe_s, 2)}
            if Path(args.slide).exists() and not rows:  # end to end for the demo model only
                image, results = args.slide, {}

                def run(key, model):
                    results[key] = ts.segment(image, model, tile_size=512, mode="logits", device="cpu",
                                              progress=False)

                torch_e2e, onnx_e2e = best_of([lambda: run("torch", net), lambda: run("onnx", path)],
                                              max(1, args.repeats - 1))
                ref, got = results["torch"], results["onnx"]
                row["torch_e2e_s"], row["onnx_e2e_s"] = round(torch_e2e, 2), round(onnx_e2e, 2)
                row["slide_mpx"] = round(ref.shape[1] * ref.shape[2] / 1e6, 2)
                row["torch_e2e_mpx_s"] = round(row["slide_mpx"] / row["torch_e2e_s"], 3)
                row["onnx_e2e_mpx_s"] = round(row["slide_mpx"] / row["onnx_e2e_s"], 3)
                row["max_rel_diff_slide"] = float(np.abs(got - ref).max() / np.abs(ref).max())
                row["labels_equal_fraction"] = float(np.mean(got.argmax(0) == ref.argmax(0)))
            rows.append(row)
            print(row)
    write_rows("onnx_vs_torch", rows)
    plot(rows)


def plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["torch_s_per_tile"] for r in rows], 0.4, label="torch (channels-last)")
    ax.bar(xs + 0.2, [r["onnx_s_per_tile"] for r in rows], 0.4, label="onnxruntime (CPU)")
    ax.set_xticks(xs, [r["model"] for r in rows])
    ax.set_ylabel("seconds per 700x700 input")
    ax.set_title(f"CPU, {rows[0]['threads']} threads: ONNX export vs torch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "onnx_vs_torch.png", dpi=120)


if __name__ == "__main__":
    main()
