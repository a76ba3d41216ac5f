"""A tilesegment reader for ``.demo`` files: the smallest complete reader plug-in.

A ``.demo`` file is one line of JSON, then the raw pixels in C order::

    {"axes": "YXS", "shape": [150, 131, 3], "dtype": "uint8", "pixel_size": [0.5, 0.5]}
    <150 * 131 * 3 bytes>

`DemoReader` implements `tilesegment.contracts.Reader`: ``can_open`` looks
at the name (cheap, never raises), ``open`` maps the pixels without reading
them and returns a `tilesegment.ImageSource`. tilesegment does the rest
(channel order, tiling, resampling to ``mpp=``).

Packaging: a reader lives in its own distribution and declares an entry
point in the ``tilesegment.readers`` group; no edit to tilesegment. In the
package's ``pyproject.toml``::

    [project.entry-points."tilesegment.readers"]
    demo = "tilesegment_demo_reader:DemoReader"

``pip install`` that package, and ``ts.open_image("x.demo")``,
``ts.segment("x.demo", ...)`` and ``tilesegment segment x.demo ...`` read
the files. (The tests put this folder, with the ``.dist-info`` that
``pip install`` would write, on ``PYTHONPATH`` instead.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from tilesegment.errors import InputError
from tilesegment.io.sources import ImageSource, Level, check_level

__all__ = ["DemoReader", "write_demo"]


class DemoReader:
    """Reads ``.demo`` files (a JSON header line, then raw pixels)."""

    name = "demo"
    priority = 30  # before the array catch-all; any specific format would do
    formats = "demo (.demo)"

    def can_open(self, target: Any) -> bool:
        """Whether `target` is a path that ends in ``.demo``."""
        return isinstance(target, (str, os.PathLike)) and str(target).lower().endswith(".demo")

    def open(self, target: Any, *, axes: Optional[str], level: int, series: int,
             storage_options: Optional[dict], ndim: int) -> ImageSource:
        """Map the pixels of the ``.demo`` file at `target` (one level, one series)."""
        path = Path(target)
        check_level(level, 1, path.name)
        try:
            with open(path, "rb") as f:
                line = f.readline()
            header = json.loads(line)
            pixels = np.memmap(path, dtype=header["dtype"], mode="r", offset=len(line),
                               shape=tuple(header["shape"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"input {path.name!r} is not a readable .demo file ({exc})") from None
        pixel_size = tuple(header["pixel_size"]) if header.get("pixel_size") else None
        spatial = tuple(n for a, n in zip(header["axes"], pixels.shape) if a in "YX")
        return ImageSource(pixels, axes or header["axes"], pixel_size, name=path.name, format="demo",
                           levels=(Level(spatial, pixel_size),))


def write_demo(path: str | os.PathLike, pixels: np.ndarray, axes: str,
               pixel_size: Optional[Sequence[float]] = None) -> Path:
    """Write `pixels` (axes `axes`, pixel size in um over Y and X) as a ``.demo`` file."""
    header = {"axes": axes, "shape": list(pixels.shape), "dtype": pixels.dtype.str,
              "pixel_size": None if pixel_size is None else [float(p) for p in pixel_size]}
    path = Path(path)
    with open(path, "wb") as f:
        f.write(json.dumps(header).encode() + b"\n")
        f.write(np.ascontiguousarray(pixels).tobytes())
    return path
