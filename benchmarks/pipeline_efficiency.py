"""Pipeline efficiency: the bare model's time over end-to-end `segment()` time.

End to end = uint8 image in memory -> labels in an OME-Zarr on disk, through
readers, executor(s), stitcher and writers. Bare model = the same number of
batches of the same shape through the network alone, on the same device and
precision. Their ratio is the fraction of time the device is doing the
network's work. Both are measured in one process, interleaved (model, end to
end, model, ...), and the figure is the median over `--repeats` pairs of
their ratio: on a shared machine the noise of one pair is shared by both.

The row also breaks one run's fixed time down (`_phases.py`): reading the
first batch (fill), creating the output, writing the last blocks (drain),
pyramid, metadata and manifest, and what only the first run in a process
pays (imports, numba's cached kernels), measured in fresh processes.

    python benchmarks/pipeline_efficiency.py                    # CPU: base 8, tile 512, batch 2, 2048^2
    python benchmarks/pipeline_efficiency.py --base 16 --batch-size 1 --name cpu_throughput_base16
    python benchmarks/pipeline_efficiency.py --device cuda      # GPU 0: tile 1024, batch auto, bf16

Output: results/pipeline_efficiency_<device>.{csv,json}. On CUDA the row also
has the model's FLOPs per written pixel and the fraction of the GPU's dense
bf16 tensor peak that end to end achieves.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

import tilesegment as ts
from _common import write_rows
from _phases import PhaseClock, breakdown, first_run_seconds
from tilesegment.bench import PEAK_TFLOPS, bare_model_seconds, flops_per_pixel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="image edge (default 2048 CPU, 8192 GPU)")
    parser.add_argument("--base", type=int, default=8)
    parser.add_argument("--tile-size", type=int, default=None, help="default 512 CPU, 1024 GPU")
    parser.add_argument("--batch-size", default=None, help="default 2 CPU, auto GPU")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default=None, help="results file stem")
    parser.add_argument("--no-first-run", action="store_true",
                        help="skip the fresh-process measurement of first-run costs")
    parser.add_argument("--tiff", action="store_true",
                        help="read the image from a JPEG-tiled TIFF (decoding included) instead of memory")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)  # "cuda" would be every GPU, timed against one GPU's model
    gpu = device.type == "cuda"
    size = args.size or (8192 if gpu else 2048)
    tile = args.tile_size or (1024 if gpu else 512)
    batch = args.batch_size or ("auto" if gpu else 2)

    torch.manual_seed(0)
    net = ts.UNet(3, 3, base_channels=args.base, depth=4).eval()
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    ts.segment(image[:64, :64], net, tile_size=16, device=device, progress=False)  # compile kernels

    with tempfile.TemporaryDirectory() as tmp:
        source = image
        if args.tiff:
            source = Path(tmp) / "image.tif"
            tifffile.imwrite(source, image, tile=(256, 256), photometric="rgb", compression="jpeg")

        def job(i):
            return ts.prepare(source, net, Path(tmp) / f"out{i}.zarr", tile_size=tile,
                              batch_size=batch, device=device, precision=args.precision)

        probe = job("probe")
        executor = probe.executors()[0]
        n_batches = -(-probe.plan.n_tiles // probe.batch_size)
        shape = (probe.batch_size, 3, *probe.plan.input_size)
        model_s, e2e_s, phases = [], [], []
        for i in range(args.repeats):
            model_s.append(bare_model_seconds(executor, n_batches, shape))
            clock = PhaseClock()
            with clock.running():
                start = time.perf_counter()
                _, stats = job(i).run(progress=False)
                phases.append(breakdown(clock.events, start, time.perf_counter()))
            e2e_s.append(stats.seconds)

    mpx = size * size / 1e6
    model, e2e = float(np.median(model_s)), float(np.median(e2e_s))
    row = {
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "torch_threads": torch.get_num_threads(), "image": size, "base_channels": args.base,
        "source": "jpeg-tiff" if args.tiff else "memory", "tile_size": tile,
        "input_size": probe.plan.input_size[0], "batch_size": probe.batch_size,
        "precision": executor.precision, "tiles": probe.plan.n_tiles, "repeats": args.repeats,
        "model_only_s": round(model, 3), "end_to_end_s": round(e2e, 3),
        "model_only_mpx_s": round(mpx / model, 3), "end_to_end_mpx_s": round(mpx / e2e, 3),
        "pipeline_efficiency": round(float(np.median(np.array(model_s) / np.array(e2e_s))), 4),
        "pipeline_efficiency_runs": [round(m / e, 4) for m, e in zip(model_s, e2e_s)],
        "model_only_runs_s": [round(m, 3) for m in model_s], "end_to_end_runs_s": [round(e, 3) for e in e2e_s],
    }
    # Seconds per phase, median over the runs; network is the executors' calls, the rest is fixed.
    row.update({f"phase_{k.split(' ')[0]}_s": round(float(np.median([p.get(k, 0.0) for p in phases])), 4)
                for k in phases[0]})
    if not args.no_first_run:
        row.update(first_run_seconds())
    fpp = flops_per_pixel(net, 3, net.geometry, (tile, tile))
    row["gflop_per_written_px"] = round(fpp / 1e9, 6)
    if gpu:
        name = row["device"]
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        achieved = fpp * mpx * 1e6 / e2e / 1e12
        row["achieved_tflops"] = round(achieved, 2)
        row["fraction_of_peak"] = round(achieved / peak, 4) if peak else None
    write_rows(args.name or f"pipeline_efficiency_{device.type}", [row])
    print(row)


if __name__ == "__main__":
    main()
