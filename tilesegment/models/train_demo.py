"""Train the bundled demo model: background (glass), tissue, nuclei in H&E.

    python -m tilesegment.models.train_demo [--svs ../shared/data/small_HE.svs] [--minutes 20]

Data, all derived by this script:

- synthetic H&E slides from `tilesegment.he.synthetic_slide` with their true
  labels (seeds 1000-1015);
- if `--svs` is given, patches of that real slide with colour-deconvolution
  pseudo-labels (`tilesegment.he.reference_masks`), from its left 70 % only:
  the right 30 % is held out for validation.

Augmentation: flips, 90-degree rotations, per-channel optical-density
scaling (stain variation) and brightness. A base-8, depth-4 valid U-Net is
trained with Adam and cross-entropy on 316-px inputs (132-px outputs) on the
CPU within the time budget, then validated on the held-out region and on an
unseen synthetic slide. Seed, data and scores are stored in the checkpoint.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import tilesegment as ts
from tilesegment.he import CLASSES, demo_scores, dice, reference_masks, synthetic_slide

DEFAULT_OUT = Path(__file__).with_name("demo_unet.pt")
INPUT = 316
SYNTHETIC_SEEDS = range(1000, 1016)
VALIDATION_SEED = 999


def _pseudo_labels(rgb: np.ndarray) -> np.ndarray:
    glass, nuclei = reference_masks(rgb)
    labels = np.ones(rgb.shape[:2], np.uint8)
    labels[glass] = 0
    labels[nuclei] = 2
    return labels


class Patches:
    """Random training crops: (input RGB uint8, centre labels) from a pool of images."""

    def __init__(self, images: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator, halo: int):
        self.images, self.rng, self.halo = images, rng, halo

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        rgb, labels = self.images[self.rng.integers(len(self.images))]
        ny, nx = labels.shape
        out = INPUT - 2 * self.halo
        if self.rng.random() < 0.7:  # mostly centred on tissue, so nuclei are seen often
            ys, xs = np.nonzero(labels[::8, ::8])
            k = self.rng.integers(len(ys)) if len(ys) else 0
            cy, cx = (ys[k] * 8, xs[k] * 8) if len(ys) else (ny // 2, nx // 2)
        else:
            cy, cx = self.rng.integers(ny), self.rng.integers(nx)
        y0 = int(np.clip(cy - out // 2, 0, ny - out))
        x0 = int(np.clip(cx - out // 2, 0, nx - out))
        pad = ((self.halo, self.halo), (self.halo, self.halo), (0, 0))
        region = np.pad(rgb, pad, mode="reflect")[y0 : y0 + INPUT, x0 : x0 + INPUT]
        return region, labels[y0 : y0 + out, x0 : x0 + out]


def _augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    k = int(rng.integers(4))
    x, y = np.rot90(x, k), np.rot90(y, k)
    if rng.random() < 0.5:
        x, y = x[:, ::-1], y[:, ::-1]
    od = -np.log((x.astype(np.float32) + 1) / 256)
    od = od * (1 + 0.08 * rng.standard_normal(3)) * rng.uniform(0.8, 1.2)
    x = np.clip(256 * np.exp(-od) - 1, 0, 255) * rng.uniform(0.95, 1.03)
    return np.clip(x, 0, 255).astype(np.uint8), np.ascontiguousarray(y)


def train(svs: Optional[Path], minutes: float, seed: int, out: Path) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = ts.UNet(3, 3, base_channels=8, depth=4)
    halo = net.geometry.halo[0]
    synthetic = Patches([synthetic_slide((1024, 1024), s) for s in SYNTHETIC_SEEDS], rng, halo)
    real = None
    if svs is not None:
        slide = ts.open_image(svs)
        rgb = slide.read(0, slide.shape[0], 0, slide.shape[1]).copy()
        split = int(rgb.shape[1] * 0.7)
        real = Patches([(rgb[:, :split], _pseudo_labels(rgb[:, :split]))], rng, halo)

    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    weights = torch.tensor([1.0, 1.0, 2.0])
    start, step, losses = time.perf_counter(), 0, []
    budget = minutes * 60
    net.train()
    while (elapsed := time.perf_counter() - start) < budget:
        lr = 1e-4 + 0.5 * (3e-3 - 1e-4) * (1 + math.cos(math.pi * elapsed / budget))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [(real if real is not None and rng.random() < 0.5 else synthetic).sample() for _ in range(8)]
        batch = [_augment(x, y, rng) for x, y in batch]
        x = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(np.stack([b[1] for b in batch])).long()
        loss = F.cross_entropy(net(x), y, weight=weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  lr {lr:.2e}  loss {np.mean(losses[-50:]):.4f}", flush=True)
    net.eval()

    validation = _validate(net, svs)
    info = {
        "classes": list(CLASSES),
        "seed": seed,
        "steps": step,
        "minutes": round((time.perf_counter() - start) / 60, 1),
        "batch": 8,
        "input_size": INPUT,
        "data": {
            "synthetic": f"tilesegment.he.synthetic_slide((1024, 1024), seed) for seeds "
                         f"{SYNTHETIC_SEEDS.start}-{SYNTHETIC_SEEDS.stop - 1}, true labels",
            "real": None if svs is None else f"{Path(svs).name}, left 70 % (x < {split}), "
                                             "colour-deconvolution pseudo-labels",
        },
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "validation": validation,
    }
    ts.save_model(net, out, **info)
    return info


def _validate(net, svs: Optional[Path]) -> dict:
    rgb, truth = synthetic_slide((1024, 1024), VALIDATION_SEED)
    pred = ts.segment(rgb, net, tile_size=512, device="cpu", progress=False)
    scores = {"synthetic_unseen": {
        "pixel_accuracy": round(float((pred == truth).mean()), 4),
        **{f"dice_{name}": round(dice(pred == k, truth == k), 4)
           for k, name in enumerate(CLASSES)},
    }}
    if svs is not None:
        slide = ts.open_image(svs)
        real = slide.read(0, slide.shape[0], 0, slide.shape[1])
        labels = ts.segment(svs, net, tile_size=512, device="cpu", progress=False)
        split = int(real.shape[1] * 0.7)
        scores["real_held_out"] = demo_scores(real[:, split:], labels[:, split:])
        scores["real_whole_slide"] = demo_scores(real, labels)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--svs", type=Path, default=None, help="real H&E slide for pseudo-labels")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    info = train(args.svs, args.minutes, args.seed, args.out)
    print(info)


if __name__ == "__main__":
    main()
