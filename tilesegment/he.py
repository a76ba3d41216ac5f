"""H&E helpers: colour deconvolution, reference masks and a synthetic slide generator.

These make the demo self-contained: the bundled model is trained on
synthetic slides and on colour-deconvolution pseudo-labels, and the same
reference masks are what its nuclei are checked against.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BOUNDARY_WIDTH",
    "CLASSES",
    "NUCLEUS_THRESHOLD",
    "boundary_ring",
    "clearly_blank",
    "demo_scores",
    "dice",
    "four_class_labels",
    "hematoxylin_eosin",
    "instance_scores",
    "reference_masks",
    "synthetic_slide",
]

#: Class names of the demo model, by label value. Nuclei are classes 2 and 3
#: together: the interior (the seeds of the instances) and its boundary ring.
CLASSES = ("background", "tissue", "nuclei", "nucleus boundary")

#: Width (px) of the nucleus boundary ring (class 3): pixels of an instance within
#: this Euclidean distance of a pixel that is not the same instance. Two touching
#: nuclei then keep their interiors at least this far apart, so the interiors are
#: separate seeds, and growing each seed by ``BOUNDARY_WIDTH + 1`` px recovers it.
BOUNDARY_WIDTH = 1

# Ruifrok & Johnston (2001) stain vectors, rows: haematoxylin, eosin, DAB (as scikit-image).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_LOG_FLOOR = np.log(1e-6)

#: Haematoxylin level (scikit-image's `rgb2hed` scale) above which a tissue pixel counts as nucleus.
NUCLEUS_THRESHOLD = 0.12


def hematoxylin_eosin(rgb: np.ndarray) -> np.ndarray:
    """Stain concentrations ``(..., 2)`` (haematoxylin, eosin) of uint8 RGB pixels.

    Same scale as ``skimage.color.rgb2hed``: optical density divided by
    ``-log(1e-6)``, projected on the Ruifrok-Johnston stain vectors.
    """
    od = np.log(np.maximum(rgb.astype(np.float32) / 255.0, 1e-6)) / _LOG_FLOOR
    return np.maximum(od @ _HED_FROM_RGB[:, :2].astype(np.float32), 0)


def _box_mean(a: np.ndarray, radius: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    k = 2 * radius + 1
    return F.avg_pool2d(F.pad(t, (radius,) * 4, mode="replicate"), k, stride=1)[0, 0].numpy()


def reference_masks(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Glass and nuclei masks of an H&E image by colour thresholds alone.

    Glass: bright (every channel > 200) and unsaturated (saturation < 0.1).
    Nuclei: outside glass, haematoxylin (3x3 mean) above `NUCLEUS_THRESHOLD`.
    This is the colour-deconvolution reference the demo model is checked
    against, not a replacement for it.
    """
    low, high = rgb.min(-1).astype(np.float32), rgb.max(-1).astype(np.float32)
    saturation = (high - low) / np.maximum(high, 1.0)
    glass = (low > 200) & (saturation < 0.1)
    h = _box_mean(hematoxylin_eosin(rgb)[..., 0], 1)
    return glass, (h > NUCLEUS_THRESHOLD) & ~glass


def clearly_blank(glass: np.ndarray, margin: int = 16) -> np.ndarray:
    """Glass pixels at least `margin` pixels away from anything that is not glass."""
    from .tissue import max_filter

    near = max_filter(torch.from_numpy((~glass).astype(np.float32))[None, None], margin)
    return glass & (near[0, 0].numpy() == 0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap ``2|a & b| / (|a| + |b|)`` of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def demo_scores(rgb: np.ndarray, labels: np.ndarray) -> dict:
    """How demo-model labels of an H&E image compare with the colour reference.

    Returns the Dice of predicted nuclei (classes 2 and 3: interior and
    boundary ring) against `reference_masks` nuclei, and the fraction of
    clearly blank glass labelled background.
    """
    glass, nuclei = reference_masks(rgb)
    blank = clearly_blank(glass)
    return {
        "nuclei_dice": round(dice((labels == 2) | (labels == 3), nuclei), 4),
        "blank_glass_as_background": round(float((labels[blank] == 0).mean()) if blank.any() else 1.0, 4),
        "blank_fraction": round(float(blank.mean()), 4),
    }


def instance_scores(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """Detection and panoptic quality of an instance map against the true one.

    A predicted and a true instance match when their IoU is above 0.5 (such a
    match is unique). TP, FP and FN count matched, unmatched predicted and
    unmatched true instances; ``f1 = 2TP / (2TP + FP + FN)`` (F1 at IoU 0.5,
    also the recognition quality RQ); ``sq`` is the mean IoU of the matches
    and ``pq = sq * rq`` (Kirillov et al. 2019). ``count_error`` is the
    predicted count minus the true count, ``relative_count_error`` the same
    divided by the true count.

    Parameters
    ----------
    predicted, truth : (Y, X) int arrays
        Instance maps, 0 where there is no object; ids need not be consecutive.
    """
    p, t = predicted.ravel().astype(np.int64), truth.ravel().astype(np.int64)
    p_ids, p = np.unique(p, return_inverse=True)
    t_ids, t = np.unique(t, return_inverse=True)
    # Index 0 is "no object" when the map has background pixels.
    p_off, t_off = int(p_ids[0] == 0), int(t_ids[0] == 0)
    n_pred, n_true = len(p_ids) - p_off, len(t_ids) - t_off
    p_area, t_area = np.bincount(p, minlength=len(p_ids)), np.bincount(t, minlength=len(t_ids))
    both = (p >= p_off) & (t >= t_off)
    pairs, inter = np.unique(p[both] * len(t_ids) + t[both], return_counts=True)
    pi, ti = pairs // len(t_ids), pairs % len(t_ids)
    iou = inter / (p_area[pi] + t_area[ti] - inter)
    matched = iou > 0.5
    tp = int(matched.sum())
    fp, fn = n_pred - tp, n_true - tp
    rq = 2 * tp / (2 * tp + fp + fn) if n_pred + n_true else 1.0
    sq = float(iou[matched].mean()) if tp else 0.0
    return {
        "true_count": n_true,
        "predicted_count": n_pred,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "f1": round(rq, 4),
        "sq": round(sq, 4),
        "pq": round(sq * rq, 4),
        "count_error": n_pred - n_true,
        "relative_count_error": round((n_pred - n_true) / n_true, 4) if n_true else 0.0,
    }


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-ish random field with features about `scale` pixels across."""
    gy, gx = (max(2, int(np.ceil(s / scale)) + 2) for s in shape)
    grid = torch.from_numpy(rng.standard_normal((1, 1, gy, gx)).astype(np.float32))
    field = F.interpolate(grid, size=(gy * int(scale), gx * int(scale)), mode="bicubic", align_corners=False)
    return field[0, 0, : shape[0], : shape[1]].numpy()


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 0), dtype=np.float32))[:, None]
    t = F.conv2d(F.pad(t, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return np.moveaxis(t[:, 0].numpy(), 0, -1)


def boundary_ring(instances: np.ndarray, width: float = BOUNDARY_WIDTH) -> np.ndarray:
    """Inner contour ring of every instance: its pixels within `width` of a pixel not of that instance.

    "Not of that instance" is another instance or 0 (no object); beyond the
    image edge counts as the same instance, so objects cut by the edge get no
    ring there. Interiors of touching instances are then more than `width`
    apart: they never touch.

    Parameters
    ----------
    instances : (Y, X) int array
        Instance map, 0 where there is no object.
    width : float
        Euclidean distance in pixels.

    Returns
    -------
    (Y, X) bool
    """
    r = int(np.floor(width))
    padded = np.pad(instances, r, mode="edge")
    ny, nx = instances.shape
    ring = np.zeros(instances.shape, bool)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if (dy or dx) and dy * dy + dx * dx <= width * width:
                ring |= padded[r + dy : r + dy + ny, r + dx : r + dx + nx] != instances
    return ring & (instances != 0)


def four_class_labels(labels: np.ndarray, instances: np.ndarray, width: float = BOUNDARY_WIDTH) -> np.ndarray:
    """Labels with the `boundary_ring` of `instances` as class 3 (nucleus boundary); 2 stays the interior."""
    out = labels.copy()
    out[boundary_ring(instances, width)] = 3
    return out


def _ellipse_radius(a: float, b: float, theta: float, phi: float) -> float:
    """Distance from the centre to the edge of an ellipse (semi-axes a, b, turned by theta) in direction phi."""
    return 1.0 / np.hypot(np.cos(phi - theta) / a, np.sin(phi - theta) / b)


def _clusters(rng: np.random.Generator, where: np.ndarray, count: int) -> list[tuple[float, float, float, float, float]]:
    """Nuclei (y, x, a, b, theta) packed in `count` clusters: each new one touches a member, or overlaps it slightly."""
    ny, nx = where.shape
    ys, xs = np.nonzero(where)
    nuclei = []
    for _ in range(count if len(ys) else 0):
        k = rng.integers(len(ys))
        members = [(float(ys[k]), float(xs[k]), rng.uniform(4, 9), rng.uniform(3.5, 6.5), rng.uniform(0, np.pi))]
        size, attempts = int(rng.integers(5, 16)), 0
        while len(members) < size and attempts < 8 * size:
            attempts += 1
            a, b, theta = rng.uniform(4, 9), rng.uniform(3.5, 6.5), rng.uniform(0, np.pi)
            y0, x0, a0, b0, t0 = members[rng.integers(len(members))]
            phi = rng.uniform(0, 2 * np.pi)
            # Centre distance 85-100 % of the two radii along the line: touching, or overlapping by a pixel or two.
            d = (_ellipse_radius(a0, b0, t0, phi) + _ellipse_radius(a, b, theta, phi)) * rng.uniform(0.85, 1.0)
            y, x = y0 + d * np.sin(phi), x0 + d * np.cos(phi)
            if not (0 <= y < ny and 0 <= x < nx and where[int(y), int(x)]):
                continue
            crowded = False
            for ym, xm, am, bm, tm in members:
                psi = np.arctan2(ym - y, xm - x)
                gap = np.hypot(ym - y, xm - x)
                crowded |= gap < 0.8 * (_ellipse_radius(am, bm, tm, psi) + _ellipse_radius(a, b, theta, psi))
            if not crowded:
                members.append((y, x, a, b, theta))
        nuclei += members
    return nuclei


def synthetic_slide(
    shape: tuple[int, int],
    seed: int = 0,
    tissue_fraction: float = 0.5,
    *,
    crowding: float = 0.0,
    boundary: bool = False,
    instances: bool = False,
) -> Union[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """An H&E-like RGB image and its true labels (0 glass, 1 tissue, 2 nuclei), optionally its nuclei.

    Tissue is a smooth random region of pink, fibrous stroma with tears and
    purple cellular areas; nuclei are dark blue-purple ellipses (4-10 px
    semi-axes, about 0.5 um/px); glass is near-white. Colours are mixed in
    optical density (Beer-Lambert) from those of a real H&E slide, with
    per-slide stain variation, blur and noise.

    Parameters
    ----------
    shape : (int, int)
        Image size (Y, X).
    seed : int
        Everything is drawn from ``numpy.random.default_rng(seed)`` (the
        clusters of `crowding` from their own generator, so that with
        ``crowding=0`` the image is the same as before crowding existed).
    tissue_fraction : float
        Approximate fraction of the image covered by tissue.
    crowding : float
        Adds clusters of 5-15 nuclei packed so that neighbours touch or overlap
        by a pixel or two, about ``crowding`` clusters per 2500 px² of tissue
        (0.3: a third of the nuclei in clusters). When > 0, nuclei are also
        shaded thicker (darker) in the middle, as real nuclei are, and a
        nucleus that would hide more than a quarter of its area under
        nuclei drawn before it is left out, so every true nucleus is visible.
    boundary : bool
        Label the `boundary_ring` of each nucleus as class 3 ("nucleus
        boundary"), the classes of the demo model; else 2, as the interior.
    instances : bool
        Also return the nuclei as an instance map.

    Returns
    -------
    rgb : (Y, X, 3) uint8
    labels : (Y, X) uint8
    instances : (Y, X) uint32, only with ``instances=True``
        0 no nucleus, 1..N one id per nucleus; where nuclei overlap, the one
        drawn later owns the pixels.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    region = _smooth_noise(rng, shape, 180.0) + 0.5 * _smooth_noise(rng, shape, 45.0)
    tissue = region > np.quantile(region, 1.0 - tissue_fraction)

    # Optical densities of the slide's typical colours (measured on an Aperio H&E skin slide).
    od_of = lambda rgb: -np.log(np.asarray(rgb, np.float32) / 255.0)  # noqa: E731
    stroma, cells, nucleus = od_of((187, 114, 155)), od_of((109, 64, 114)), od_of((46, 24, 66))
    # Wavy collagen fibres with white tears; purple, cellular (epidermis-like) areas.
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    along = np.cos(angle) * xx + np.sin(angle) * yy
    fibres = np.sin(along / rng.uniform(4, 7) + 4.0 * _smooth_noise(rng, shape, 40.0)) ** 2
    tears = _smooth_noise(rng, shape, 12.0) + 0.8 * fibres > 1.4
    cellular = np.clip(_smooth_noise(rng, shape, 90.0) - 0.3, 0, 1)
    strength = np.where(tissue & ~tears, 0.45 + 0.75 * fibres, 0.0)
    od = strength[..., None] * ((1 - cellular[..., None]) * stroma + cellular[..., None] * cells)

    labels = tissue.astype(np.uint8)
    ids = np.zeros(shape, np.uint32)
    crowded = crowding > 0
    drawn = [0]  # nuclei drawn so far: the id of the latest

    def draw(y: float, x: float, a: float, b: float, theta: float, source: np.random.Generator) -> None:
        r = int(np.ceil(max(a, b))) + 1
        iy, ix = int(y), int(x)
        y0, y1, x0, x1 = max(0, iy - r), min(ny, iy + r + 1), max(0, ix - r), min(nx, ix + r + 1)
        dy, dx = yy[y0:y1, x0:x1] - y, xx[y0:y1, x0:x1] - x
        u = (np.cos(theta) * dx + np.sin(theta) * dy) / a
        v = (-np.sin(theta) * dx + np.cos(theta) * dy) / b
        inside = u * u + v * v <= 1.0
        # Drawn in this order whether or not the nucleus is kept, so the generator's stream does not depend on it.
        darkness = source.uniform(0.75, 1.2) * (1 + 0.1 * source.standard_normal((int(inside.sum()), 1)))
        window = ids[y0:y1, x0:x1]
        if crowded:
            if not inside.any() or (window[inside] != 0).mean() > 0.25:
                return
            # Thicker, so darker, in the middle: touching nuclei show a lighter seam.
            darkness = darkness * (0.8 + 0.35 * np.sqrt(np.maximum(0, 1 - (u * u + v * v)[inside])))[:, None]
        od[y0:y1, x0:x1][inside] = nucleus * darkness
        labels[y0:y1, x0:x1][inside] = 2
        drawn[0] += 1
        window[inside] = drawn[0]

    n_nuclei = int(tissue.sum() / rng.uniform(300, 700))
    cy, cx = rng.integers(0, ny, n_nuclei), rng.integers(0, nx, n_nuclei)
    keep = tissue[cy, cx]
    for y, x in zip(cy[keep], cx[keep]):
        a, b = rng.uniform(4, 10), rng.uniform(3.5, 7)
        theta = rng.uniform(0, np.pi)
        draw(int(y), int(x), a, b, theta, rng)
    if crowded:
        extra = np.random.default_rng([seed, 1])
        for nucleus_args in _clusters(extra, tissue & ~tears, int(extra.poisson(crowding * tissue.sum() / 2500))):
            draw(*nucleus_args, extra)

    # Per-slide stain variation, slide background tint, blur and sensor noise.
    od = od * (1 + 0.07 * rng.standard_normal(3)) * rng.uniform(0.85, 1.15)
    rgb = np.exp(-od) * (np.array([246, 243, 243]) / 255.0 + 0.01 * rng.standard_normal(3))
    rgb = _blur(rgb.astype(np.float32), rng.uniform(0.6, 1.2))
    rgb = rgb + 0.012 * rng.standard_normal(rgb.shape)
    rgb = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
    # Ids in drawing order, less those drawn over entirely, renumbered 1..N.
    present = np.unique(ids)
    renumber = np.zeros(drawn[0] + 1, np.uint32)
    renumber[present[present != 0]] = np.arange(1, int((present != 0).sum()) + 1, dtype=np.uint32)
    ids = renumber[ids]
    if boundary:
        labels = four_class_labels(labels, ids)
    return (rgb, labels, ids) if instances else (rgb, labels)
