"""Peak resident memory of `tilesegment segment` does not grow with the image.

Writes tiled JPEG RGB TIFFs of 4096^2 and 16384^2 pixels, segments each in a
fresh process (CLI, labels to OME-Zarr on disk) and records the process's
peak RSS (ru_maxrss). Output: results/memory_scaling.{csv,json,png}.

    python benchmarks/memory_scaling.py [--sizes 4096,16384] [--base 4]

A small network (base 4, depth 4) keeps the 268-Mpx run short; memory of the
pipeline, not of the model, is what is measured.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import RESULTS, plot_peak_rss, synthetic_rgb_tiff, write_rows

CHILD = """
import resource, sys, time
from tilesegment.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print("PEAK_RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - start)
sys.exit(code)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,16384")
    parser.add_argument("--base", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=512)
    args = parser.parse_args()
    import torch

    import tilesegment as ts

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = ts.save_model(ts.UNet(3, 3, base_channels=args.base, depth=4), tmp / "net.pt")
        for size in (int(s) for s in args.sizes.split(",")):
            image = synthetic_rgb_tiff(tmp / f"slide{size}.tif", size)
            cmd = [sys.executable, "-c", CHILD, "segment", str(image), str(tmp / f"out{size}.zarr"),
                   "--model", str(model), "--tile-size", str(args.tile_size), "--device", "cpu", "--quiet"]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            line = next(l for l in done.stdout.splitlines() if l.startswith("PEAK_RSS_MB"))
            peak, seconds = (float(v) for v in line.split()[1:])
            rows.append({"size": size, "megapixels": size * size / 1e6, "peak_rss_mb": round(peak, 1),
                         "seconds": round(seconds, 2),
                         "mpx_per_s": round(size * size / 1e6 / seconds, 3),
                         "tiff_mb": round(image.stat().st_size / 1e6, 1)})
            print(rows[-1], flush=True)
            image.unlink()
    write_rows("memory_scaling", rows)
    plot_peak_rss([r["megapixels"] for r in rows], [r["peak_rss_mb"] for r in rows], "image",
                  RESULTS / "memory_scaling.png")
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"peak RSS ratio {rows[-1]['size']}^2 / {rows[0]['size']}^2: {ratio:.3f}")


if __name__ == "__main__":
    main()
