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
  decoded at open, which is timed with the reads);
- the SVS converted to DICOM by wsidicomizer (its JPEG tiles copied, so the
  same encoded tiles) through wsidicom, one frame per chunk;
- the same pixels as a CZI of zstd subblocks (pylibCZIrw) against a tiled
  TIFF of zstd tiles of the same size, so both decode the same codec.

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
    from pylibCZIrw import czi as pyczi
    from wsidicomizer import WsiDicomizer

    dicom = work / "svs-dicom"
    dicom.mkdir()
    WsiDicomizer.convert(args.svs, dicom, tile_size=ts.open_image(args.svs).chunk_shape[0], include_label=False,
                         include_overview=False, include_thumbnail=False)
    zstd_tiff = work / "same-zstd.tif"
    tifffile.imwrite(zstd_tiff, rgb, tile=(256, 256), photometric="rgb", compression="zstd",
                     compressionargs={"level": 1})
    czi = work / "same.czi"
    with pyczi.create_czi(str(czi), exist_ok=True) as w:
        for y in range(0, rgb.shape[0], 256):
            for x in range(0, rgb.shape[1], 256):
                w.write(rgb[y:y + 256, x:x + 256, ::-1].copy(), plane={"C": 0}, location=(x, y),
                        compression_options="zstd0:ExplicitLevel=1")
    cases = {
        ("svs (JPEG)", "tifffile"): lambda: ts.open_image(args.svs),
        ("svs (JPEG)", "openslide"): lambda: open_slide(args.svs),
        ("tiled TIFF (deflate)", "tifffile"): lambda: ts.open_image(tiff),
        ("tiled TIFF (deflate)", "openslide"): lambda: open_slide(tiff),
        ("PNG", "plain (Pillow, whole)"): lambda: ts.open_image(png),
        ("svs (JPEG)", "dicom (wsidicom)"): lambda: ts.open_image(dicom),
        ("tiled TIFF (zstd)", "tifffile"): lambda: ts.open_image(zstd_tiff),
        ("tiled TIFF (zstd)", "czi (pylibCZIrw)"): lambda: ts.open_image(czi),
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
    refs = {r["image"]: r for r in rows if r["reader"] == "tifffile"}
    refs["PNG"] = refs["tiled TIFF (deflate)"]
    for r in rows:  # against tifffile decoding the same pixels, from the same codec where both can
        r["vs_tifffile"] = round(refs[r["image"]]["seconds"] / r["seconds"], 3)
    write_rows("readers", rows)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
