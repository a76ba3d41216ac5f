"""Touching nuclei: instances of the demo model, plain connected components against seeds + grow.

On a held-out synthetic slide with crowded nuclei (``synthetic_slide(...,
crowding=0.3)``, a seed no training used) the demo model's labels are turned
into nuclei two ways and scored against the true instances
(`tilesegment.he.instance_scores`: F1 at IoU 0.5, panoptic quality, count
error):

- **plain CC**: connected components of the nucleus pixels, classes 2 and 3
  together (what labelling a nuclei mask gives, as the pipeline did before
  the boundary class);
- **seeds + grow**: the model's recipe, ``metadata["instances"]``: the
  components of class 2 (interiors) are the seeds, and each class-3
  (boundary) pixel joins the nearest seed within ``grow`` px
  (``ts.label_objects(labels, classes=[2], grow=k, grow_into=[3])``).

Both are also applied to the *true* 4-class labels, as a check of the recipe
itself (seeds + grow should give back every nucleus there).

On the real slide ``small_HE.svs`` (no true instances) it reports the
nucleus count and area quartiles of both, and the nuclei Dice (classes 2 and
3) against the colour-deconvolution reference, whole slide and held-out right
30 %. With ``--picture`` it also draws docs/images/objects-crowded.jpg: the
real slide's most crowded crop, outlines of plain CC beside seeds + grow.

Output: results/instances.{csv,json}.

    python benchmarks/instances.py [--size 2048] [--seed 4321] [--svs PATH] [--picture] [--model demo]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import write_rows

ROOT = Path(__file__).resolve().parents[1]
PICTURE = ROOT / "docs" / "images" / "objects-crowded.jpg"


def plain_components(labels: np.ndarray) -> np.ndarray:
    """Connected components (face neighbours) of the nucleus pixels, classes 2 and 3 together."""
    import tilesegment as ts

    nuclei = np.where(labels == 3, 2, labels)
    return np.asarray(ts.label_objects(nuclei, classes=[2], progress=False).labels)


def seeds_and_grow(labels: np.ndarray, recipe: dict) -> np.ndarray:
    """The model's instance recipe: components of the seed classes, grown into `grow_into` pixels."""
    import tilesegment as ts

    return np.asarray(ts.label_objects(labels, classes=recipe["classes"], grow=recipe["grow"],
                                       grow_into=recipe["grow_into"], progress=False).labels)


def _areas(instances: np.ndarray) -> dict:
    areas = np.bincount(instances.ravel())[1:]
    areas = areas[areas > 0]
    q1, q2, q3 = np.percentile(areas, [25, 50, 75]) if len(areas) else (0, 0, 0)
    return {"count": int(len(areas)), "area_q1": float(q1), "area_median": float(q2), "area_q3": float(q3)}


def synthetic_rows(model, recipe: dict, size: int, seed: int) -> list[dict]:
    import tilesegment as ts
    from tilesegment.he import dice, instance_scores, synthetic_slide

    rgb, truth, instances = synthetic_slide((size, size), seed, crowding=0.3, boundary=True, instances=True)
    start = time.perf_counter()
    labels = ts.segment(rgb, model, tile_size=512, device="cpu", progress=False)
    seconds = time.perf_counter() - start
    rows = []
    for source, lab in (("model", labels), ("true labels", truth)):
        for method, find in (("plain CC", plain_components), ("seeds + grow", lambda x: seeds_and_grow(x, recipe))):
            start = time.perf_counter()
            found = find(lab)
            rows.append({
                "data": f"synthetic {size}² seed {seed}, crowding 0.3", "labels": source, "method": method,
                **instance_scores(found, instances),
                "nuclei_dice": round(dice(lab >= 2, truth >= 2), 4),
                "seconds": round(time.perf_counter() - start + (seconds if source == "model" else 0), 2),
            })
    return rows


def real_rows(model, recipe: dict, svs: str, picture: bool) -> list[dict]:
    import tilesegment as ts
    from tilesegment.he import demo_scores

    source = ts.open_image(svs)
    rgb = source.read(0, source.shape[0], 0, source.shape[1])
    labels = ts.segment(svs, model, tile_size=512, device="cpu", progress=False)
    split = int(rgb.shape[1] * 0.7)
    whole, held_out = demo_scores(rgb, labels), demo_scores(rgb[:, split:], labels[:, split:])
    found = {"plain CC": plain_components(labels), "seeds + grow": seeds_and_grow(labels, recipe)}
    rows = [{"data": f"{Path(svs).name} {rgb.shape[0]}x{rgb.shape[1]}", "labels": "model", "method": method,
             **_areas(objects), "nuclei_dice_whole": whole["nuclei_dice"],
             "nuclei_dice_held_out_right_30pct": held_out["nuclei_dice"]}
            for method, objects in found.items()]
    if picture:
        draw_picture(rgb, found["plain CC"], found["seeds + grow"])
    return rows


def draw_picture(rgb: np.ndarray, plain: np.ndarray, grown: np.ndarray, edge: int = 240, zoom: int = 2) -> Path:
    """Outlines of plain CC beside seeds + grow over the crop where they differ most in count."""
    import imagecodecs

    from tilesegment.demo import CLASS_COLOURS, outline

    best, where = -1, (0, 0)
    for y in range(0, rgb.shape[0] - edge + 1, edge // 4):
        for x in range(0, rgb.shape[1] - edge + 1, edge // 4):
            gained = len(np.unique(grown[y : y + edge, x : x + edge])) - len(np.unique(plain[y : y + edge, x : x + edge]))
            if gained > best:
                best, where = gained, (y, x)
    y, x = where
    panels = []
    for objects in (plain, grown):
        crop = rgb[y : y + edge, x : x + edge].repeat(zoom, 0).repeat(zoom, 1).copy()
        crop[outline(objects[y : y + edge, x : x + edge].repeat(zoom, 0).repeat(zoom, 1))] = CLASS_COLOURS[2]
        panels.append(crop)
    gap = np.full((edge * zoom, 8, 3), 255, np.uint8)
    PICTURE.write_bytes(imagecodecs.jpeg_encode(np.concatenate([panels[0], gap, panels[1]], 1), level=85))
    print(f"{PICTURE}: crop y={y} x={x} {edge}², plain CC (left) vs seeds + grow (right)")
    return PICTURE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=4321)
    parser.add_argument("--svs", default=str(ROOT.parent / "shared" / "data" / "small_HE.svs"))
    parser.add_argument("--picture", action="store_true", help="also draw " + str(PICTURE.relative_to(ROOT)))
    parser.add_argument("--model", default="demo", help="a candidate checkpoint to score instead of the demo model")
    args = parser.parse_args()
    import tilesegment as ts

    model = ts.load_model(args.model)
    recipe = model.metadata["instances"]
    rows = synthetic_rows(model, recipe, args.size, args.seed)
    if Path(args.svs).exists():
        rows += real_rows(model, recipe, args.svs, args.picture)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    rows = [{k: row.get(k, "") for k in keys} for row in rows]
    for row in rows:
        print(row)
    write_rows("instances", rows)


if __name__ == "__main__":
    main()
