"""tilesegment against torch-em's `predict_with_halo` on a 3-D valid U-Net, on CPU.

    pip install -e ".[bench]"                      # bioimage-cpp (torch-em's blocking) and matplotlib
    pip install --no-deps torch-em==0.10.9         # its other dependencies (torchvision...) are not needed
    python benchmarks/volume_vs_torch_em.py [--shape 64,256,256] [--threads 2] [--repeats 3]
                                            [--pipelined] [--quick]

Two anisotropic valid 3-D U-Nets (base 8, random weights, first pooling
(1, 2, 2), then (2, 2, 2)): depth 2 (halo 12/20/20, step 2/4/4) and depth 3
(halo 24/44/44, step 4/8/8). One smooth random uint8 volume (Z, Y, X) in
memory -> float32 logits in memory, with

- tilesegment: ``segment(volume, net, tile_size=tile, mode="logits")``;
- torch-em: ``predict_with_halo(volume, net, ["cpu"], block_shape, halo)``
  with the network's halo, the block shape that gives the same network input
  as tilesegment's tile (so both make the same number of calls of the same
  size), the same normalisation (uint8 / 255) as ``preprocess``, and a
  ``prediction_function`` that zero-pads the network output by the halo;
- the same torch-em call with the network and each block in channels-last
  (NDHWC) layout, as tilesegment's CPU executor runs it (oneDNN's faster
  layout), set up by hand;
- with ``--pipelined``, torch-em's ``predict_with_halo_pipelined`` (four
  loader threads), same arguments, batch size 1.

torch-em crops ``halo`` from each side of the network output, i.e. it
assumes the network returns as many voxels as it is given; a valid network
has already lost them, so without the padding hook every block fails with a
shape error (recorded in the JSON). Both tools run in this one process,
alternated, best of ``--repeats``, with the same torch threads, float32 and
batch size 1. Exactness: the largest absolute difference of each tool's
logits to one forward pass over the whole volume reflect-padded by the halo,
and that difference relative to the largest logit.
Output: results/volume_vs_torch_em.{csv,json,png}.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tilesegment as ts
from _common import RESULTS, plot_speed_and_error, write_rows

NETS = {
    "depth2": dict(depth=2, pooling=[(1, 2, 2), (2, 2, 2)]),
    "depth3": dict(depth=3, pooling=[(1, 2, 2), (2, 2, 2), (2, 2, 2)]),
}
METHODS = ["tilesegment", "torch-em predict_with_halo", "torch-em predict_with_halo, channels-last"]
PIPELINED = "torch-em predict_with_halo_pipelined"


def torch_em_prediction():
    """Return the module ``torch_em.util.prediction``.

    ``import torch_em`` runs the package's ``__init__``, which imports the
    whole training stack and torchvision (which this project keeps out of its
    environments). The prediction module itself needs only numpy, torch, tqdm
    and bioimage-cpp, so when the normal import fails it is loaded from its
    file under empty parent packages. Its code runs unchanged; only the
    default ``preprocess`` (``standardize``, from a module that imports
    torchvision) is missing, and this benchmark always passes its own.
    """
    try:
        return importlib.import_module("torch_em.util.prediction")
    except ImportError:
        for name in [n for n in sys.modules if n == "torch_em" or n.startswith("torch_em.")]:
            del sys.modules[name]
    spec = importlib.util.find_spec("torch_em")
    if spec is None:
        sys.exit("torch-em is not installed: pip install --no-deps torch-em==0.10.9 bioimage-cpp")
    root = Path(spec.submodule_search_locations[0])
    for name, folder in (("torch_em", root), ("torch_em.util", root / "util"),
                         ("torch_em.transform", root / "transform")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    raw = types.ModuleType("torch_em.transform.raw")
    raw.standardize = None  # the default preprocess; never used here
    sys.modules[raw.__name__] = raw
    return importlib.import_module("torch_em.util.prediction")


def build(name: str, base: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return ts.UNet(1, 2, base_channels=base, ndim=3, **NETS[name]).eval()


def smooth_volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """uint8 volume of smoothed noise (blob-like structure at a few voxels' scale)."""
    from scipy.ndimage import gaussian_filter

    noise = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    smooth = gaussian_filter(noise, sigma=(1.0, 2.0, 2.0))
    return np.clip(128 + smooth / smooth.std() * 50, 0, 255).astype(np.uint8)


def whole_volume_logits(volume: np.ndarray, net: torch.nn.Module) -> np.ndarray:
    """Logits of one forward pass over the volume reflect-padded by the halo (what tiling must equal)."""
    geom = ts.Geometry.of(net)
    n_in = geom.input_size(volume.shape)
    pad = [(h, n - s - h) for h, n, s in zip(geom.halo, n_in, volume.shape)]
    x = np.pad(volume, pad, mode="reflect").astype(np.float32) * np.float32(1 / 255)
    with torch.inference_mode():
        out = net(torch.from_numpy(x)[None, None])[0]
    return out[(slice(None),) + tuple(slice(0, s) for s in volume.shape)].numpy()


def run(method: str, volume: np.ndarray, net, tile: tuple[int, ...], pred) -> np.ndarray:
    geom = ts.Geometry.of(net)
    if method == "tilesegment":
        return ts.segment(volume, net, None, tile_size=tile, axes="ZYX", mode="logits", device="cpu",
                          batch_size=1, progress=False)
    # the block whose valid output comes from the same network input as tilesegment's tile
    block = geom.output_size(geom.input_size(tile))
    pad_back = tuple(h for h in reversed(geom.halo) for _ in (0, 1))
    out = np.zeros((2,) + volume.shape, np.float32)
    kwargs = dict(output=out, preprocess=lambda b: b.astype(np.float32) * np.float32(1 / 255),
                  prediction_function=lambda n, x: F.pad(n(x), pad_back), disable_tqdm=True)
    if method == "torch-em predict_with_halo":
        pred.predict_with_halo(volume, net, ["cpu"], block, geom.halo, **kwargs)
    elif method == "torch-em predict_with_halo, channels-last":
        # What tilesegment's CPU executor does (oneDNN is faster on NDHWC), done by hand.
        layout = torch.channels_last_3d
        kwargs["prediction_function"] = lambda n, x: F.pad(n(x.contiguous(memory_format=layout)),
                                                           pad_back)
        pred.predict_with_halo(volume, channels_last(net), ["cpu"], block, geom.halo, **kwargs)
    elif method == PIPELINED:
        pred.predict_with_halo_pipelined(volume, net, ["cpu"], block, geom.halo, batch_size=1, **kwargs)
    else:
        raise ValueError(method)
    return out


_CHANNELS_LAST: dict[int, torch.nn.Module] = {}


def channels_last(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of `net` with its weights in channels-last (NDHWC) layout, made once."""
    import copy

    if id(net) not in _CHANNELS_LAST:
        _CHANNELS_LAST[id(net)] = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)
    return _CHANNELS_LAST[id(net)]


def without_padding_hook(volume: np.ndarray, net, tile, pred) -> str:
    """What torch-em does with a valid network and no output padding (the error it raises)."""
    geom = ts.Geometry.of(net)
    block = geom.output_size(geom.input_size(tile))
    try:
        pred.predict_with_halo(volume, net, ["cpu"], block, geom.halo,
                               output=np.zeros((2,) + volume.shape, np.float32),
                               preprocess=lambda b: b.astype(np.float32) / 255, disable_tqdm=True)
    except Exception as exc:  # noqa: BLE001 - the finding is whatever it raises
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,256,256", help="volume Z,Y,X")
    parser.add_argument("--tile", default="32,128,128", help="tilesegment tile Z,Y,X")
    parser.add_argument("--nets", default="depth2,depth3")
    parser.add_argument("--base", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipelined", action="store_true",
                        help="also run torch-em's predict_with_halo_pipelined (4 loader threads)")
    parser.add_argument("--quick", action="store_true", help="32x128x128 volume, tile 16,64,64, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.shape, args.tile, args.repeats = "32,128,128", "16,64,64", 1
    shape = tuple(int(v) for v in args.shape.split(","))
    tile = tuple(int(v) for v in args.tile.split(","))
    torch.set_num_threads(args.threads)
    pred = torch_em_prediction()
    methods = METHODS + [PIPELINED] * args.pipelined
    volume = smooth_volume(shape)
    rows, notes = [], {}
    for name in args.nets.split(","):
        net = build(name, args.base)
        geom = ts.Geometry.of(net)
        start = time.perf_counter()
        reference = whole_volume_logits(volume, net)
        print(f"{name}: {geom}; whole-volume reference in {time.perf_counter() - start:.1f} s", flush=True)
        notes[name] = {"geometry": {"halo": geom.halo, "step": geom.step, "min_input": geom.min_input},
                       "torch_em_without_padding_hook": without_padding_hook(volume, net, tile, pred)}
        warm = tuple(min(s, t) for s, t in zip(shape, tile))
        for method in methods:  # compile numba kernels, warm oneDNN
            run(method, volume[: warm[0], : warm[1], : warm[2]].copy(), net, tile, pred)
        times: dict[str, list[float]] = {m: [] for m in methods}
        errors: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeats):
            for method in methods:
                start = time.perf_counter()
                out = run(method, volume, net, tile, pred)
                times[method].append(time.perf_counter() - start)
                diff = float(np.abs(out - reference).max())
                errors[method] = (diff, diff / float(np.abs(reference).max()))
                print(f"  {method}: {times[method][-1]:.2f} s, max abs diff {diff:.3g}", flush=True)
        best_ts = min(times["tilesegment"])
        n_in = geom.input_size(tile)
        for method in methods:
            best = min(times[method])
            rows.append({
                "net": name, "method": method, "volume": "x".join(map(str, shape)),
                "network_input": "x".join(map(str, n_in)),
                "block": "x".join(map(str, tile if method == "tilesegment" else geom.output_size(n_in))),
                "threads": args.threads, "batch": 1, "seconds": round(best, 2),
                "all_seconds": " ".join(f"{t:.2f}" for t in times[method]),
                "mvox_s": round(float(np.prod(shape)) / 1e6 / best, 3),
                "time_vs_tilesegment": round(best / best_ts, 3),
                "max_abs_diff": float(f"{errors[method][0]:.3g}"),
                "max_rel_diff": float(f"{errors[method][1]:.3g}"),
            })
            print(rows[-1], flush=True)
    csv_path, json_path = write_rows("volume_vs_torch_em", rows)
    data = json.loads(json_path.read_text())
    data.update(notes=notes, load_avg_1min=round(os.getloadavg()[0], 2), torch=torch.__version__,
                torch_em=_version("torch-em"), bioimage_cpp=_version("bioimage-cpp"))
    json_path.write_text(json.dumps(data, indent=2))
    plot_speed_and_error([f"{r['net']}: {r['method']}" for r in rows], [r["mvox_s"] for r in rows],
                         [r["max_rel_diff"] for r in rows], "throughput (Mvox/s)",
                         "max rel. logit error vs whole volume", RESULTS / "volume_vs_torch_em.png",
                         height=0.6 * len(rows) + 1.2)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
