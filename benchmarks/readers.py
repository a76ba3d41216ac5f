"""Read throughput per reader on the same pixels, against tifffile's decode of the same image.

Each case reads a whole image chunk by chunk on its own grid
(`ImageSource.read_chunk`, what decode-once reading does per source chunk),
in one thread, from a fresh open; the cases run interleaved, median of the
repeats. Images:

- the real slide ``small_HE.svs`` (JPEG tiles, 240²) through tifffile and
  through OpenSlide (``read_region`` per tile: OpenSlide has no tile API);
- the same pixels as a tiled deflate TIFF (OpenSlide's generic-tiff) through
  both;
- the same pixels as a PNG through the plain-image reader (the whole file is
  decoded at open, which is timed with the reads).

Output: results/readers.{csv,json}.

    python benchmarks/readers.py [--svs PATH] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import write_rows

ROOT = Path(__file__).resolve().parents[1]


def _read_all(open_source) -> float:
    """Seconds to open the image and read every chunk of its grid."""
    start = time.perf_counter()
    source = open_source()
    if source.chunk_shape is None:  # in memory (a plain image, decoded at open): one region
        source.read_region((0, 0), source.shape)
    else:
        grid = [range(-(-n // e)) for n, e in zip(source.shape, source.chunk_shape)]
        for i in grid[0]:
            for j in grid[1]:
                source.read_chunk(i, j)
    source.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--svs", default=str(ROOT.parent / "shared" / "data" / "small_HE.svs"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import tifffile
    from PIL import Image

    import tilesegment as ts
    from tilesegment.io.formats.openslide import open_slide

    work = Path(tempfile.mkdtemp(prefix="readers_"))
    rgb = ts.open_image(args.svs).read_region((0, 0), ts.open_image(args.svs).shape)
    tiff = work / "same.tif"
    tifffile.imwrite(tiff, rgb, tile=(256, 256), photometric="rgb", compression="zlib")
    png = work / "same.png"
    Image.fromarray(rgb).save(png, compress_level=1)
    cases = {
        ("svs (JPEG)", "tifffile"): lambda: ts.open_image(args.svs),
        ("svs (JPEG)", "openslide"): lambda: open_slide(args.svs),
        ("tiled TIFF (deflate)", "tifffile"): lambda: ts.open_image(tiff),
        ("tiled TIFF (deflate)", "openslide"): lambda: open_slide(tiff),
        ("PNG", "plain (Pillow, whole)"): lambda: ts.open_image(png),
    }
    times: dict = {key: [] for key in cases}
    for _ in range(args.repeats):
        for key, opener in cases.items():
            times[key].append(_read_all(opener))
    mpx = rgb.shape[0] * rgb.shape[1] / 1e6
    rows = []
    for (image, reader), ts_ in times.items():
        seconds = statistics.median(ts_)
        rows.append({"image": image, "reader": reader, "megapixels": round(mpx, 2), "seconds": round(seconds, 4),
                     "mpx_per_s": round(mpx / seconds, 1)})
    svs_ref = next(r for r in rows if r["image"] == "svs (JPEG)" and r["reader"] == "tifffile")
    tiff_ref = next(r for r in rows if r["image"] == "tiled TIFF (deflate)" and r["reader"] == "tifffile")
    for r in rows:  # against tifffile decoding the same pixels (the PNG: against the deflate TIFF)
        ref = svs_ref if r["image"] == "svs (JPEG)" else tiff_ref
        r["vs_tifffile"] = round(ref["seconds"] / r["seconds"], 3)
    write_rows("readers", rows)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
