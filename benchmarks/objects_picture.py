"""The picture of docs/objects.md: nuclei objects outlined over a crop of the real slide.

Segments ../shared/data/small_HE.svs with the demo model (tile and chunk 256),
labels the nuclei across chunks (the model's recipe: interiors grown into
their boundary class), and draws each object's outline (yellow) and
the tissue border (green) over the slide, as docs/images/objects-real-crop.jpg.

    python benchmarks/objects_picture.py [--svs PATH]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--svs", default=str(ROOT.parent / "shared" / "data" / "small_HE.svs"))
    parser.add_argument("--crop", default="980,760,420,640", help="y,x,height,width")
    args = parser.parse_args()
    import imagecodecs

    import tilesegment as ts
    from tilesegment.demo import CLASS_COLOURS, outline
    from tilesegment.he import CLASSES

    y, x, h, w = (int(v) for v in args.crop.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "he.zarr"
        labels = ts.segment(args.svs, "demo", out, tile_size=256, chunk_size=256, progress=False)
        objs = ts.label_objects(out, class_names=CLASSES, progress=False)  # the model's recipe: seeds + grow
        lab = labels[y:y + h, x:x + w]
        obj = objs.labels[y:y + h, x:x + w]
    source = ts.open_image(args.svs)
    crop = source.read(y, y + h, x, x + w)
    crop[outline((lab != 0).astype(np.uint8))] = CLASS_COLOURS[1]
    crop[outline(np.where(lab >= 2, obj, 0))] = CLASS_COLOURS[2]  # nuclei: interior 2 and boundary 3
    path = ROOT / "docs" / "images" / "objects-real-crop.jpg"
    path.write_bytes(imagecodecs.jpeg_encode(np.ascontiguousarray(crop), level=85))
    print(f"{len(objs)} nuclei; wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
