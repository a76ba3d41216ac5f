"""Train the bundled demo model: background (glass), tissue, nuclei and nucleus boundary in H&E.

    python -m tilesegment.models.train_demo [--svs ../shared/data/small_HE.svs] [--minutes 25]

Classes: 0 background, 1 tissue, 2 nucleus interior, 3 nucleus boundary (the
inner contour ring of each nucleus, `tilesegment.he.boundary_ring`, width
`BOUNDARY_WIDTH`). Nuclei are 2 and 3 together; the interiors of touching
nuclei never touch, so they are the seeds of the instances, and growing each
seed into the boundary pixels within ``BOUNDARY_WIDTH + 1`` px recovers the
nucleus: the recipe stored as ``metadata["instances"]``.

Data, all derived by this script:

- synthetic H&E slides from `tilesegment.he.synthetic_slide` with crowded
  clusters of touching nuclei (``crowding=0.3``) and their true labels, the
  ring taken from the true instances (seeds 1000-1015);
- if `--svs` is given, patches of that real slide with colour-deconvolution
  pseudo-labels (`tilesegment.he.reference_masks`), from its left 70 % only:
  the right 30 % is held out for validation. The real slide has no
  instances, so its ring is that of the connected components of the nuclei
  mask. A component larger than `MERGED_AREA` is most likely several
  touching nuclei, where the truth would put rings inside it that its
  components cannot know: its inner pixels are labelled "nucleus, interior
  or boundary" and scored by the summed probability of the two classes
  (a partial label), so the real slide teaches where nuclei are without
  teaching the model to merge touching ones.

Loss: cross-entropy with class weights 1/1/2/2 and, after the U-Net paper's
weight map, an extra weight `CONTACT_WEIGHT` on boundary pixels within
`BOUNDARY_WIDTH` of another nucleus (where touching nuclei meet), the pixels
whose mistakes merge instances. The ring is 1 px wide: with 2 px the model
predicted a third of the true interior pixels, so small nuclei had no seed
(instance F1 0.80, real-slide nuclei Dice 0.84, against 0.97 and 0.90 with
1 px; ``benchmarks/results/train_demo_width2.log``). Class weights 1/1/3/1,
to favour the interior instead, did worse on every score
(``benchmarks/results/train_demo_weights_1-1-3-1.log``).

Augmentation: flips, 90-degree rotations,
per-channel optical-density scaling (stain variation) and brightness. A
base-8, depth-4 valid U-Net is trained with Adam on 316-px inputs (132-px
outputs) on the CPU within the time budget, then validated on the held-out
region and on an unseen synthetic slide. Seed, data, recipe and scores are
stored in the checkpoint.
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
from tilesegment.he import BOUNDARY_WIDTH, CLASSES, demo_scores, dice, four_class_labels, reference_masks, synthetic_slide

DEFAULT_OUT = Path(__file__).with_name("demo_unet.pt")
INPUT = 316
SYNTHETIC_SEEDS = range(1000, 1016)
VALIDATION_SEED = 999
CROWDING = 0.3
#: Label of "nucleus, interior or boundary": scored by p(2) + p(3).
EITHER_NUCLEUS = 4
#: Connected components of the real slide's nuclei mask above this area (px) are taken as merged nuclei.
MERGED_AREA = 400
CLASS_WEIGHTS = (1.0, 1.0, 2.0, 2.0, 2.0)  # by label, EITHER_NUCLEUS last
#: Extra loss weight of boundary pixels where two nuclei meet.
CONTACT_WEIGHT = 6.0
#: How the instances of the model's labels are found (`tilesegment.label_objects` keywords).
INSTANCES = {"classes": [2], "grow_into": [3], "grow": BOUNDARY_WIDTH + 1}


def _contact(instances: np.ndarray, width: float = BOUNDARY_WIDTH) -> np.ndarray:
    """Nucleus pixels within `width` of a pixel of another nucleus (not of the background)."""
    r = int(np.floor(width))
    padded = np.pad(instances, r)
    ny, nx = instances.shape
    near = np.zeros(instances.shape, bool)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if (dy or dx) and dy * dy + dx * dx <= width * width:
                other = padded[r + dy : r + dy + ny, r + dx : r + dx + nx]
                near |= (other != 0) & (other != instances)
    return near & (instances != 0)


def _synthetic(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb, labels, instances = synthetic_slide((1024, 1024), seed, crowding=CROWDING, boundary=True, instances=True)
    return rgb, labels, _contact(instances)


def _pseudo_labels(rgb: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    glass, nuclei = reference_masks(rgb)
    labels = np.ones(rgb.shape[:2], np.uint8)
    labels[glass] = 0
    labels[nuclei] = 2
    components, _ = ndimage.label(nuclei)
    labels = four_class_labels(labels, components)
    merged = np.bincount(components.ravel())[components] > MERGED_AREA
    labels[merged & (components != 0) & (labels == 2)] = EITHER_NUCLEUS
    return labels


class Patches:
    """Random training crops: (input RGB uint8, centre labels, centre contact mask) from a pool of images."""

    def __init__(self, images: list[tuple[np.ndarray, np.ndarray, np.ndarray]], rng: np.random.Generator, halo: int):
        self.images, self.rng, self.halo = images, rng, halo

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rgb, labels, contact = self.images[self.rng.integers(len(self.images))]
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
        return region, labels[y0 : y0 + out, x0 : x0 + out], contact[y0 : y0 + out, x0 : x0 + out]


def _augment(x: np.ndarray, y: np.ndarray, c: np.ndarray,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = int(rng.integers(4))
    x, y, c = np.rot90(x, k), np.rot90(y, k), np.rot90(c, k)
    if rng.random() < 0.5:
        x, y, c = x[:, ::-1], y[:, ::-1], c[:, ::-1]
    od = -np.log((x.astype(np.float32) + 1) / 256)
    od = od * (1 + 0.08 * rng.standard_normal(3)) * rng.uniform(0.8, 1.2)
    x = np.clip(256 * np.exp(-od) - 1, 0, 255) * rng.uniform(0.95, 1.03)
    return np.clip(x, 0, 255).astype(np.uint8), np.ascontiguousarray(y), np.ascontiguousarray(c)


def _loss(logits: torch.Tensor, labels: torch.Tensor, contact: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy; `EITHER_NUCLEUS` pixels score ``-log(p2 + p3)``."""
    logp = F.log_softmax(logits, dim=1)
    either = labels == EITHER_NUCLEUS
    nll = -logp.gather(1, labels.clamp(max=3)[:, None])[:, 0]
    nll = torch.where(either, -torch.logsumexp(logp[:, 2:4], dim=1), nll)
    weight = torch.tensor(CLASS_WEIGHTS)[labels] * (1 + CONTACT_WEIGHT * contact)
    return (weight * nll).sum() / weight.sum()


def train(svs: Optional[Path], minutes: float, seed: int, out: Path) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = ts.UNet(3, len(CLASSES), base_channels=8, depth=4)
    halo = net.geometry.halo[0]
    synthetic = Patches([_synthetic(s) for s in SYNTHETIC_SEEDS], rng, halo)
    real = None
    if svs is not None:
        slide = ts.open_image(svs)
        rgb = slide.read(0, slide.shape[0], 0, slide.shape[1]).copy()
        split = int(rgb.shape[1] * 0.7)
        real_labels = _pseudo_labels(rgb[:, :split])
        real = Patches([(rgb[:, :split], real_labels, np.zeros(real_labels.shape, bool))], rng, halo)

    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    start, step, losses = time.perf_counter(), 0, []
    budget = minutes * 60
    net.train()
    while (elapsed := time.perf_counter() - start) < budget:
        lr = 1e-4 + 0.5 * (3e-3 - 1e-4) * (1 + math.cos(math.pi * elapsed / budget))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [(real if real is not None and rng.random() < 0.5 else synthetic).sample() for _ in range(8)]
        batch = [_augment(x, y, c, rng) for x, y, c in batch]
        x = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(np.stack([b[1] for b in batch])).long()
        c = torch.from_numpy(np.stack([b[2] for b in batch])).float()
        loss = _loss(net(x), y, c)
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
        "instances": dict(INSTANCES),
        "seed": seed,
        "steps": step,
        "minutes": round((time.perf_counter() - start) / 60, 1),
        "batch": 8,
        "input_size": INPUT,
        "loss": {"class_weights": list(CLASS_WEIGHTS[:4]), "contact_weight": CONTACT_WEIGHT,
                 "boundary_width": BOUNDARY_WIDTH},
        "data": {
            "synthetic": f"tilesegment.he.synthetic_slide((1024, 1024), seed, crowding={CROWDING}, boundary=True) "
                         f"for seeds {SYNTHETIC_SEEDS.start}-{SYNTHETIC_SEEDS.stop - 1}, true labels and instances",
            "real": None if svs is None else f"{Path(svs).name}, left 70 % (x < {split}), "
                                             "colour-deconvolution pseudo-labels, boundary ring of their "
                                             f"connected components; inside components > {MERGED_AREA} px "
                                             "either nucleus class",
        },
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "validation": validation,
    }
    ts.save_model(net, out, **info)
    return info


def _validate(net, svs: Optional[Path]) -> dict:
    rgb, truth = synthetic_slide((1024, 1024), VALIDATION_SEED, crowding=CROWDING, boundary=True)
    pred = ts.segment(rgb, net, tile_size=512, device="cpu", progress=False)
    scores = {"synthetic_unseen": {
        "pixel_accuracy": round(float((pred == truth).mean()), 4),
        **{f"dice_{name.replace(' ', '_')}": round(dice(pred == k, truth == k), 4)
           for k, name in enumerate(CLASSES)},
        "dice_nuclei_with_boundary": round(dice(pred >= 2, truth >= 2), 4),
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
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    info = train(args.svs, args.minutes, args.seed, args.out)
    print(info)


if __name__ == "__main__":
    main()
