"""tilesegment against what users would run instead, on the same valid U-Net, image and machine.

    pip install -e ".[bench]"          # adds MONAI and matplotlib
    python benchmarks/compare_tools.py [--size 3072] [--base 8] [--threads 2]

Methods (each in a fresh process, so peak RSS is its own):

- tilesegment: `segment(mode="logits")`, tile 512, image in memory -> logits in memory;
- monai-overlap0 / monai-overlap0.25-gaussian: MONAI `sliding_window_inference`
  with roi 516 (network input 700), the network wrapped to reflect-pad its own
  halo, as MONAI users run a valid U-Net;
- naive-loop: a Python loop over 512 tiles of the reflect-padded image;
- dask-map-overlap: `dask.array.map_overlap` with depth = halo and the model in
  each 512 block.

Each reports wall time, Mpx/s, peak RSS during the run, and the maximum
relative difference of its logits to one whole-image forward pass of the
reflect-padded image (seams). Output: results/compare_tools.{csv,json,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tilesegment as ts
from _common import RESULTS, plot_speed_and_error, write_rows
from tilesegment.bench import _PeakRSS

METHODS = ["tilesegment", "monai-overlap0", "monai-overlap0.25-gaussian", "naive-loop", "dask-map-overlap"]


def build(base: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return ts.UNet(3, 3, base_channels=base, depth=4).eval()


class PaddedNet(torch.nn.Module):
    """A valid U-Net that reflect-pads each window by its halo, so output size == input size."""

    def __init__(self, net, halo: int):
        super().__init__()
        self.net, self.halo = net, halo

    def forward(self, x):
        return self.net(F.pad(x, (self.halo,) * 4, mode="reflect"))


def run_method(method: str, image: np.ndarray, net, tile: int) -> np.ndarray:
    geom = net.geometry
    halo = geom.halo[0]
    x = image.astype(np.float32).transpose(2, 0, 1) / 255.0  # (3, Y, X), as the loader normalizes
    if method == "tilesegment":
        return ts.segment(image, net, tile_size=tile, mode="logits", device="cpu", progress=False)
    if method.startswith("monai"):
        from monai.inferers import sliding_window_inference

        roi = geom.output_size(geom.input_size(tile))[0]  # 516: window + 2 * halo is a valid input
        overlap = 0.25 if "0.25" in method else 0.0
        blend = "gaussian" if "gaussian" in method else "constant"
        with torch.inference_mode():
            out = sliding_window_inference(torch.from_numpy(x)[None], (roi, roi), 1, PaddedNet(net, halo),
                                           overlap=overlap, mode=blend)
        return out[0].numpy()
    if method == "naive-loop":
        ny, nx = image.shape[:2]
        n_in = geom.input_size(tile)[0]
        padded = np.pad(x, ((0, 0), (halo, halo + tile + n_in), (halo, halo + tile + n_in)), mode="reflect")
        out = np.zeros((3, ny, nx), np.float32)
        with torch.inference_mode():
            for y in range(0, ny, tile):
                for xx in range(0, nx, tile):
                    window = torch.from_numpy(np.ascontiguousarray(padded[None, :, y : y + n_in, xx : xx + n_in]))
                    res = net(window)[0, :, : min(tile, ny - y), : min(tile, nx - xx)]
                    out[:, y : y + tile, xx : xx + tile] = res.numpy()
        return out
    if method == "dask-map-overlap":
        import dask.array as da

        n_in = geom.input_size(tile)[0]

        def block(b):
            h, w = b.shape[1] - 2 * halo, b.shape[2] - 2 * halo
            b = np.pad(b, ((0, 0), (0, n_in - b.shape[1]), (0, n_in - b.shape[2])), mode="reflect")
            with torch.inference_mode():
                return net(torch.from_numpy(np.ascontiguousarray(b))[None])[0, :, :h, :w].numpy()

        arr = da.from_array(x, chunks=(3, tile, tile))
        res = arr.map_overlap(block, depth={0: 0, 1: halo, 2: halo}, boundary="reflect", trim=False,
                              dtype=np.float32)
        return res.compute(scheduler="threads")
    raise ValueError(method)


def child(args) -> None:
    torch.set_num_threads(args.threads)
    net = build(args.base)
    image = np.load(args.image)
    run_method(args.method, image[:256, :256], net, 128)  # warm up kernels and oneDNN
    with _PeakRSS() as rss:
        start = time.perf_counter()
        out = run_method(args.method, image, net, args.tile)
        seconds = time.perf_counter() - start
    reference = np.load(args.reference, mmap_mode="r")
    diff = float(np.abs(out - reference).max() / np.abs(reference).max())
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mb": rss.peak, "max_rel_diff": diff}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=3072)
    parser.add_argument("--base", type=int, default=8)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--image", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return child(args)

    from tilesegment.he import synthetic_slide
    from tilesegment.testing import whole_image_logits

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        image, _ = synthetic_slide((args.size, args.size), seed=11)
        np.save(Path(tmp) / "image.npy", image)
        np.save(Path(tmp) / "reference.npy", whole_image_logits(image, build(args.base)))
        rows = []
        for method in METHODS:
            cmd = [sys.executable, __file__, "--method", method, "--image", str(Path(tmp) / "image.npy"),
                   "--reference", str(Path(tmp) / "reference.npy"), "--size", str(args.size),
                   "--base", str(args.base), "--tile", str(args.tile), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"{method} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            res = json.loads(line[7:])
            rows.append({"method": method, "image": args.size, "base_channels": args.base,
                         "threads": args.threads, "seconds": round(res["seconds"], 2),
                         "mpx_s": round(args.size**2 / 1e6 / res["seconds"], 3),
                         "peak_rss_mb": round(res["peak_rss_mb"], 0),
                         "max_rel_diff_vs_whole_image": float(f"{res['max_rel_diff']:.3g}")})
            print(rows[-1], flush=True)
    write_rows("compare_tools", rows)
    plot_speed_and_error([r["method"] for r in rows], [r["mpx_s"] for r in rows],
                         [r["max_rel_diff_vs_whole_image"] for r in rows], "throughput (Mpx/s)",
                         "max relative logit error vs whole image", RESULTS / "compare_tools.png")


if __name__ == "__main__":
    main()
