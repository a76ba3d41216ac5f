"""CPU throughput of `segment()` for a base-16, depth-4 U-Net at tile 512.

Measures, in one run, end-to-end Mpx/s (uint8 image in memory -> labels in
memory) and the bare model on the same tiles and batch size, so their ratio
(pipeline efficiency) is robust to machine noise. Output:
results/cpu_throughput.{csv,json}.

    python benchmarks/cpu_throughput.py [--size 2048] [--base 16] [--tile-size 512]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import tilesegment as ts
from _common import write_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--base", type=int, default=16)
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    net = ts.UNet(3, 3, base_channels=args.base, depth=4).eval()
    image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    job = ts.prepare(image, net, tile_size=args.tile_size, batch_size=args.batch_size, device="cpu")
    n_in = job.plan.input_size
    ts.segment(image[:64, :64], net, tile_size=16, progress=False)  # compile numba kernels

    start = time.perf_counter()
    _, stats = job.run(progress=False)
    end_to_end = time.perf_counter() - start

    x = torch.rand(args.batch_size, 3, *n_in)
    batches = -(-job.plan.n_tiles // args.batch_size)
    with torch.inference_mode():
        net(x)  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            net(x)
        model_only = time.perf_counter() - start

    mpx = args.size**2 / 1e6
    row = {
        "image": args.size, "base_channels": args.base, "tile_size": args.tile_size,
        "input_size": n_in[0], "batch_size": args.batch_size, "tiles": job.plan.n_tiles,
        "torch_threads": torch.get_num_threads(),
        "end_to_end_s": round(end_to_end, 3), "model_only_s": round(model_only, 3),
        "end_to_end_mpx_s": round(mpx / end_to_end, 4), "model_only_mpx_s": round(mpx / model_only, 4),
        "pipeline_efficiency": round(model_only / end_to_end, 4),
    }
    write_rows("cpu_throughput", [row])
    print(row)


if __name__ == "__main__":
    main()
