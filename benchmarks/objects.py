"""Whole objects across chunks: peak memory against map size, and speed next to dask-image.

Writes nuclei-density label maps (0 glass, 1 tissue, 2 nuclei: about 400
nuclei per megapixel, 4-12 px radius, some touching, many cut by chunk
borders) of 4096^2 and 16384^2 pixels as zarr arrays in 1024^2 chunks, then
labels the nuclei of each in a fresh process, recording the process's peak
RSS (ru_maxrss) and the time of the labelling alone (imports and numba's
cache excluded by a warm-up on a tiny map):

- tilesegment: ``ts.label_objects(map, out.zarr, classes=[2])`` (instance
  labels written to zarr with a pyramid, plus the table);
- dask-image: ``dask_image.ndmeasure.label(da.from_zarr(map) == 2)`` stored
  with ``da.to_zarr`` (the same work: labels on disk).

The two labelings are checked to be the same partition (whole map compared
at the smallest size, object counts at every size).
Output: results/objects.{csv,json,png}.

    python benchmarks/objects.py [--sizes 4096,16384] [--no-dask-image] [--maps DIR]

``--maps DIR`` keeps the generated maps there and reuses them (the 16384^2
one takes minutes to draw).

    python benchmarks/objects.py --speed [--repeats 5] [--maps DIR]

measures speed against ``scipy.ndimage.label`` instead: an 8192^2 map in
1024^2 chunks whose nuclei have a 2-px boundary ring (class 3, as a model
with a boundary class predicts), each run in a fresh process, the tools
interleaved, median of `repeats`:

- scipy: ``ndimage.label(map == 2)`` on the whole array in memory (loaded
  before the clock starts);
- tilesegment: ``ts.label_objects(map, out.zarr, classes=[2])``;
- tilesegment grow 4: the same with ``grow=4, grow_into=[3]`` (seeds grown
  into their rings, labels measured again).

Output: results/objects_speed.{csv,json}, with the ratios of throughput.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import RESULTS, write_rows

CELL = 40  # one nucleus per 40x40 px cell (~625 per Mpx; ~375 objects remain: tissue only, some touch)

CHILD = """
import resource, sys, time
tool, src, out = sys.argv[1:4]
import numpy as np
if tool.startswith("tilesegment"):
    import tilesegment as ts
    grow = {"grow": 4, "grow_into": [3]} if tool.endswith("grow 4") else {}
    warm = np.eye(8, dtype=np.uint8) * 2 + np.eye(8, k=1, dtype=np.uint8) * 3
    ts.label_objects(warm, classes=[2], progress=False, **grow)  # imports, numba cache
    seen = []  # (chunk steps done, total, time): labelled, written, then grown
    start = time.perf_counter()
    n = len(ts.label_objects(src, out, classes=[2], progress=lambda d, t: seen.append((d, t, time.perf_counter())),
                             **grow))
    if grow:  # the grow pass: after every chunk was labelled and written (2 of the 3 steps per chunk)
        written = next(s for d, t, s in seen if 3 * d >= 2 * t)
        print("PASS", time.perf_counter() - written)
elif tool == "scipy":
    import zarr
    from scipy import ndimage
    whole = zarr.open_array(src, mode="r")[...]
    start = time.perf_counter()
    n = ndimage.label(whole == 2)[1]
else:
    import dask, dask.array as da
    from dask_image.ndmeasure import label
    label(da.from_array(np.eye(8, dtype=bool), chunks=4))[0].compute()  # imports
    start = time.perf_counter()
    labels, count = label(da.from_zarr(src) == 2)
    _, n = dask.compute(da.to_zarr(labels, out, compute=False), count)
seconds = time.perf_counter() - start
print("RESULT", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seconds, int(n))
"""


def _hash(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic pseudo-random floats in [0, 1) per integer pair (a, b)."""
    h = (a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (b.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
    h ^= np.uint64(salt) * np.uint64(0x165667B19E3779F9)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def nuclei_map(y0: int, x0: int, h: int, w: int, ring: float = 0.0) -> np.ndarray:
    """The map's pixels [y0, y0+h) x [x0, x0+w): same values whatever the chunking.

    With `ring` > 0 the outer `ring` pixels of each nucleus are class 3 (a
    nucleus boundary, as a 4-class model predicts), its interior class 2.
    """
    yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w]
    out = np.where(np.sin(yy / 700.0) + np.cos(xx / 900.0) > -0.6, 1, 0).astype(np.uint8)  # tissue
    cy, cx = yy // CELL, xx // CELL
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            ny, nx = cy + dy, cx + dx
            centre_y = (ny + _hash(ny, nx, 1)) * CELL
            centre_x = (nx + _hash(ny, nx, 2)) * CELL
            radius = 4 + 8 * _hash(ny, nx, 3)
            d2 = (yy - centre_y) ** 2 + (xx - centre_x) ** 2
            inside = (d2 <= radius**2) & (out == 1)
            out[inside] = 2 if not ring else np.where(d2 <= (radius - ring) ** 2, 2, 3)[inside]
    return out


def write_map(path: Path, size: int, chunk: int = 1024, ring: float = 0.0):
    import zarr

    array = zarr.create_array(path, shape=(size, size), chunks=(chunk, chunk), dtype=np.uint8)
    for y in range(0, size, chunk):
        for x in range(0, size, chunk):
            array[y:y + chunk, x:x + chunk] = nuclei_map(y, x, min(chunk, size - y), min(chunk, size - x), ring)
    return array


def run(tool: str, src: Path, out: Path, timeout: float) -> dict:
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, tool, str(src), str(out)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT")), None)
    if line is None:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    peak, seconds, n = line.split()[1:]
    got = {"peak_rss_mb": round(float(peak), 1), "seconds": round(float(seconds), 3), "objects": int(n)}
    step = next((l for l in done.stdout.splitlines() if l.startswith("PASS")), None)
    if step is not None:
        got["grow_pass_seconds"] = round(float(step.split()[1]), 3)
    return got


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    if not ((a > 0) == (b > 0)).all():
        return False
    mask = a > 0
    pairs = np.unique(a[mask].astype(np.uint64) << np.uint64(32) | b[mask].astype(np.uint64))
    return len(pairs) == len(np.unique(a[mask])) == len(np.unique(b[mask]))


def speed(maps: Path, repeats: int, timeout: float, size: int = 8192) -> list[dict]:
    """Interleaved runs of scipy and tilesegment (plain, grow 4) on a ringed nuclei map; medians."""
    src = maps / f"ring{size}.zarr"
    if not src.exists():
        write_map(src, size, ring=2.0)
    tools = ("scipy", "tilesegment", "tilesegment grow 4")
    runs: dict[str, list[dict]] = {tool: [] for tool in tools}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for tool in tools:
                out = Path(tmp) / f"out{r}.zarr"
                got = run(tool, src, out, timeout)
                print(tool, got, flush=True)
                runs[tool].append(got)
                import shutil

                shutil.rmtree(out, ignore_errors=True)
    rows = []
    for tool in tools:
        ok = [g for g in runs[tool] if "seconds" in g]
        if not ok:
            rows.append({"tool": tool, "error": runs[tool][-1].get("error", "failed")})
            continue
        seconds = float(np.median([g["seconds"] for g in ok]))
        rows.append({"tool": tool, "size": size, "megapixels": round(size * size / 1e6, 1), "runs": len(ok),
                     "seconds": round(seconds, 3), "mpx_per_s": round(size * size / 1e6 / seconds, 1),
                     "peak_rss_mb": max(g["peak_rss_mb"] for g in ok), "objects": ok[0]["objects"]})
        if "grow_pass_seconds" in ok[0]:
            rows[-1]["grow_pass_seconds"] = round(float(np.median([g["grow_pass_seconds"] for g in ok])), 3)
    by = {r["tool"]: r for r in rows if "seconds" in r}
    for r in rows:
        if "seconds" in r and "scipy" in by:
            r["throughput_vs_scipy"] = round(by["scipy"]["seconds"] / r["seconds"], 3)
        if r["tool"] == "tilesegment grow 4" and "tilesegment" in by:
            r["throughput_vs_plain"] = round(by["tilesegment"]["seconds"] / r["seconds"], 3)
            # the grow pass alone (reading the numbered seeds, growing, writing, measuring again)
            r["grow_pass_vs_plain"] = round(by["tilesegment"]["seconds"] / r["grow_pass_seconds"], 3)
    keys = ["tool", "size", "megapixels", "runs", "seconds", "mpx_per_s", "throughput_vs_scipy",
            "throughput_vs_plain", "grow_pass_seconds", "grow_pass_vs_plain", "peak_rss_mb", "objects", "error"]
    rows = [{k: r.get(k, "") for k in keys} for r in rows]
    write_rows("objects_speed", rows)
    for r in rows:
        print(r)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", action="store_true", help="scipy vs tilesegment (plain, grow 4) at 8192^2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="4096,16384")
    parser.add_argument("--no-dask-image", action="store_true")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--maps", default=None, help="folder to keep and reuse the generated maps in")
    parser.add_argument("--dask-image-sizes", default=None,
                        help="sizes to run dask-image on (default: all; it needs minutes at 16384^2)")
    args = parser.parse_args()
    if args.speed:
        with tempfile.TemporaryDirectory() as tmp:
            speed(Path(args.maps) if args.maps else Path(tmp), args.repeats, args.timeout)
        return
    import zarr

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in (int(s) for s in args.sizes.split(",")):
            src = (Path(args.maps) if args.maps else tmp) / f"map{size}.zarr"
            if not (args.maps and src.exists()):
                write_map(src, size)
            results = {}
            theirs = not args.no_dask_image and (args.dask_image_sizes is None or
                                                 str(size) in args.dask_image_sizes.split(","))
            for tool in ("tilesegment",) + (("dask-image",) if theirs else ()):
                out = tmp / f"{tool}{size}.zarr"
                results[tool] = run(tool, src, out, args.timeout)
                row = {"tool": tool, "size": size, "megapixels": round(size * size / 1e6, 1), **results[tool]}
                if "seconds" in results[tool]:
                    row["mpx_per_s"] = round(size * size / 1e6 / results[tool]["seconds"], 2)
                rows.append(row)
                print(row, flush=True)
            if len(results) == 2 and all("objects" in r for r in results.values()):
                equal = results["tilesegment"]["objects"] == results["dask-image"]["objects"]
                if size == min(int(s) for s in args.sizes.split(",")):
                    ours = zarr.open_array(tmp / f"tilesegment{size}.zarr" / "0")[:]
                    theirs = zarr.open_array(tmp / f"dask-image{size}.zarr")[:]
                    equal = equal and same_partition(ours, theirs)
                for row in rows[-2:]:
                    row["equal_to_other"] = bool(equal)
                print(f"size {size}: same objects as dask-image: {equal}", flush=True)
            for path in tmp.glob(f"*{size}.zarr"):  # outputs (and maps not kept)
                import shutil

                shutil.rmtree(path)
    keys = ["tool", "size", "megapixels", "peak_rss_mb", "seconds", "objects", "mpx_per_s", "equal_to_other",
            "error"]
    rows = [{k: r.get(k, "") for k in keys} for r in rows]
    write_rows("objects", rows)
    _plot(rows)
    ours = [r for r in rows if r["tool"] == "tilesegment" and r["peak_rss_mb"] != ""]
    if len(ours) >= 2:
        print(f"peak RSS ratio {ours[-1]['size']}^2 / {ours[0]['size']}^2: "
              f"{ours[-1]['peak_rss_mb'] / ours[0]['peak_rss_mb']:.3f}")


def _plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tools = sorted({r["tool"] for r in rows}, reverse=True)
    sizes = sorted({r["size"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    width = 0.8 / len(tools)
    for i, tool in enumerate(tools):
        got = {r["size"]: r for r in rows if r["tool"] == tool}
        xs = np.arange(len(sizes)) + i * width
        for ax, key in zip(axes, ("mpx_per_s", "peak_rss_mb")):
            ax.bar(xs, [got.get(s, {}).get(key) or 0 for s in sizes], width, label=tool)
    for ax, title in zip(axes, ("throughput (Mpx/s)", "peak RSS (MB)")):
        ax.set_xticks(np.arange(len(sizes)) + width * (len(tools) - 1) / 2, [f"{s}²" for s in sizes])
        ax.set_title(title)
        ax.set_xlabel("label map")
    axes[0].legend()
    fig.suptitle("labelling nuclei across 1024² chunks (2 CPU cores)")
    fig.tight_layout()
    fig.savefig(RESULTS / "objects.png", dpi=120)


if __name__ == "__main__":
    main()
