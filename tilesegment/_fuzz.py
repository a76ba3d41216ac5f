"""Damaged and hostile inputs, made deterministically from a seed, and the CLI's answer to each.

A fuzz case copies one valid input (a tiled TIFF, an SVS, an OME-TIFF, an
OME-Zarr, a bioimage.io package, a checkpoint), damages it one way
(`MUTATORS`: header bytes, IFD entries, tile offsets and byte counts,
truncation, tile bytes; zarr metadata and chunks; zip members and
checksums; pickles that carry code), runs ``tilesegment segment`` or
``info`` on it through `tilesegment.cli.main` in a fresh working folder and
sorts the outcome. The contract every case must meet:

- ``ok``: the run finished (a damaged tile with ``--on-error skip`` is
  filled and recorded: ``skipped``);
- ``exit1`` / ``exit2``: one ``tilesegment: error:`` line that names the
  damaged file, no traceback;

and never an unexpected exception (``unexpected``: the CLI's catch-all
line), an error line without the file's name (``unnamed``), a hang, a crash
signal, or a file written outside the output (``stray-file``,
``side-effect``). `run_cases` runs the cases in a worker process (one
interpreter for all of them: milliseconds a case) that it restarts after a
crash or a hang, so a signal or a deadlock is one failed case, not a lost
run. ``tests/test_fuzz.py`` runs a few hundred cases; ``benchmarks/fuzz.py``
sweeps seeds.

This module is for tests and benchmarks, not part of the public API.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

__all__ = ["KINDS", "BAD", "Case", "Result", "make_inputs", "plan_cases", "run_cases", "count_outcomes"]

#: Input kinds and the share of cases each gets (`plan_cases`).
KINDS = {
    "tiff-jpeg": 0.15, "tiff-deflate": 0.09, "tiff-zstd": 0.09, "svs-like": 0.11, "ome-tiff": 0.11,
    "shared-svs": 0.08, "zarr-v3": 0.12, "zarr-v2": 0.08, "zarr-project": 0.06, "checkpoint": 0.08,
    "bioimageio": 0.03,
}
#: Outcomes that break the contract.
BAD = ("harness", "unexpected", "traceback", "unnamed", "noisy", "stray-file", "side-effect", "hang", "crash",
       "other-exit")
#: The shared Aperio slide (tests skip its kind when it is absent).
SHARED_SVS = Path(__file__).resolve().parents[2] / "shared" / "data" / "small_HE.svs"

_SIZE = (160, 192)  # image edge: one 64-px tile grid of 3 x 3 (smaller last column)
_MARK = "fuzz-payload-ran"  # the file a hostile pickle would create


# --------------------------------------------------------------------------- inputs


def _image() -> np.ndarray:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0 : _SIZE[0], 0 : _SIZE[1]]
    base = np.stack([200 - 60 * np.sin(yy / 9.0), 140 + 50 * np.cos(xx / 7.0), 190 + 0 * yy], -1)
    return np.clip(base + rng.normal(0, 15, base.shape), 0, 255).astype(np.uint8)


def _tiff(path: Path, compression: str, *, bigtiff: bool = False, ome: bool = False,
          description: Optional[str] = None) -> Path:
    """A tiled RGB TIFF with a two-level pyramid in SubIFDs and a pixel size."""
    import tifffile

    rgb = _image()
    options = dict(tile=(64, 64), photometric="rgb", compression=compression, resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=ome) as tif:
        # Without OME, tifffile's own JSON description ({"shape": ...}), another thing to damage.
        meta = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5} if ome else {}
        tif.write(rgb, subifds=1, resolution=(2e4, 2e4), metadata=meta, description=description, **options)
        tif.write(rgb[::2, ::2], subfiletype=1, resolution=(1e4, 1e4), **options)
    return path


def _svs_like(path: Path) -> Path:
    """An Aperio-style file: tiled JPEG baseline, stripped thumbnail, a reduced level as a page."""
    import tifffile

    rgb = _image()
    head = f"Aperio Image Library v12.0.0\r\n{_SIZE[1]}x{_SIZE[0]} [0,0 {_SIZE[1]}x{_SIZE[0]}] (64x64) JPEG/RGB Q=70"
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(64, 64), photometric="rgb", compression="jpeg",
                  description=head + "|AppMag = 20|MPP = 0.499")
        tif.write(rgb[::4, ::4], photometric="rgb", compression="jpeg", description=head + " -> 48x40")
        tif.write(rgb[::2, ::2], tile=(64, 64), photometric="rgb", compression="jpeg", description=head)
    return path


def _zarr_image(path: Path, version: int) -> Path:
    """An OME-Zarr image written by zarr directly: (C, Y, X) uint8, two levels, 64-px chunks."""
    import zarr

    group = zarr.open_group(path, mode="w", zarr_format=version)
    data = np.ascontiguousarray(np.moveaxis(_image(), -1, 0))
    group.create_array("0", data=data, chunks=(3, 64, 64))
    group.create_array("1", data=np.ascontiguousarray(data[:, ::2, ::2]), chunks=(3, 64, 64))
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]
    datasets = [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1, 0.5 * 2**i, 0.5 * 2**i]}]}
                for i in range(2)]
    ms = {"axes": axes, "datasets": datasets}
    if version == 2:
        group.attrs["multiscales"] = [{"version": "0.4", **ms}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    return path


def _network():
    """The tiny valid U-Net of the fuzz runs (3 channels in, 3 classes), fixed weights."""
    import torch

    from .models.unet import UNet

    torch.manual_seed(0)
    net = UNet(3, 3, base_channels=4, depth=2)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    return net.eval()


def make_inputs(folder: Path, kinds: Iterable[str] = KINDS, package: Optional[Path] = None) -> dict[str, Path]:
    """Write one valid input of each kind in `kinds` into `folder`, plus ``model.pt``.

    ``package`` is a valid bioimage.io package (``.zip``) to damage; without
    it the ``bioimageio`` kind is left out (building one needs the test
    helpers of ``tests/test_bioimageio.py``). ``shared-svs`` is left out when
    the shared slide is absent. Returns the path of each kind's input, and
    of ``"model"``.
    """
    from .models.load import save_model
    from .api import segment

    folder.mkdir(parents=True, exist_ok=True)
    made = {"model": save_model(_network(), folder / "model.pt"), "image": _tiff(folder / "plain.tif", "zlib")}
    for kind in kinds:
        if kind == "tiff-jpeg":
            made[kind] = _tiff(folder / "jpeg.tif", "jpeg")
        elif kind == "tiff-deflate":
            made[kind] = _tiff(folder / "deflate.tif", "zlib", bigtiff=True)
        elif kind == "tiff-zstd":
            made[kind] = _tiff(folder / "zstd.tif", "zstd")
        elif kind == "svs-like":
            made[kind] = _svs_like(folder / "aperio.svs")
        elif kind == "ome-tiff":
            made[kind] = _tiff(folder / "image.ome.tif", "zlib", ome=True)
        elif kind == "shared-svs" and SHARED_SVS.exists():
            made[kind] = SHARED_SVS
        elif kind == "zarr-v3":
            made[kind] = _zarr_image(folder / "v3.ome.zarr", 3)
        elif kind == "zarr-v2":
            made[kind] = _zarr_image(folder / "v2.ome.zarr", 2)
        elif kind == "zarr-project":  # an OME-Zarr the project writes: 3 channels of probabilities
            made[kind] = folder / "probabilities.ome.zarr"
            segment(_image(), made["model"], made[kind], tile_size=64, mode="probabilities", progress=False,
                    overwrite=True,
                    device="cpu")
        elif kind == "checkpoint":
            made[kind] = made["model"]
        elif kind == "bioimageio" and package is not None:
            made[kind] = Path(package)
    return made


# --------------------------------------------------------------------------- mutators: TIFF


def _tiff_layout(path: Path) -> dict:
    """Where a TIFF keeps its IFD entries, tile offsets and byte counts (positions in the file)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        big, order = tif.is_bigtiff, tif.byteorder
        pages, seen = [], set()
        for series in tif.series:
            for level in series.levels:
                for page in level.pages:
                    if page is not None and page.offset not in seen:
                        seen.add(page.offset)
                        pages.append(page)
        entries, tiles = [], []
        for page in pages:
            for tag in page.tags.values():
                entries.append({"at": tag.offset, "code": tag.code, "count": tag.count,
                                "inline": tag.valueoffset == tag.offset + (12 if big else 8)})
            offsets = page.tags.get("TileOffsets") or page.tags.get("StripOffsets")
            counts = page.tags.get("TileByteCounts") or page.tags.get("StripByteCounts")
            if offsets is None or counts is None:
                continue
            size = offsets.valuebytecount // max(1, offsets.count)
            for i, (o, n) in enumerate(zip(page.dataoffsets, page.databytecounts)):
                tiles.append({"offset_at": offsets.valueoffset + i * size, "count_at": counts.valueoffset + i * size,
                              "size": size, "offset": int(o), "bytes": int(n)})
    return {"big": big, "order": order, "entries": entries, "tiles": tiles}


def _put(data: bytearray, at: int, value: int, size: int, order: str) -> None:
    if 0 <= at and at + size <= len(data):
        data[at : at + size] = (int(value) % (1 << (8 * size))).to_bytes(size, "little" if order == "<" else "big")


#: Tags whose values decide how pixels are laid out: mutated more often than others.
_LAYOUT_TAGS = (256, 257, 258, 259, 262, 277, 284, 322, 323, 324, 325, 339, 347, 530)


def mutate_tiff(rng: np.random.Generator, path: Path, what: Optional[str] = None) -> tuple[str, bool]:
    """Damage the TIFF at `path` in place; return what was done, and whether only tile bytes changed
    (the run then uses ``--on-error skip``: the tile is filled and recorded)."""
    layout = _tiff_layout(path)
    data = bytearray(path.read_bytes())
    big, order = layout["big"], layout["order"]
    word = 8 if big else 4
    what = what or rng.choice(["header", "ifd-type", "ifd-count", "ifd-value", "ifd-code", "layout-tag", "tile-offset",
                       "tile-bytecount", "truncate", "tile-data", "bitflip", "description"],
                      p=[.05, .07, .08, .08, .05, .14, .1, .1, .09, .12, .06, .06])
    tile_only = False
    if what == "header":
        at = int(rng.integers(0, 16 if big else 8))
        data[at] = int(rng.integers(0, 256))
        note = f"byte {at}"
    elif what in ("ifd-type", "ifd-count", "ifd-value", "ifd-code", "layout-tag"):
        entries = layout["entries"]
        if what == "layout-tag":
            entries = [e for e in entries if e["code"] in _LAYOUT_TAGS and e["inline"]] or entries
        entry = entries[int(rng.integers(len(entries)))]
        at = entry["at"]
        if what == "ifd-type":
            value = int(rng.choice([0, 1, 2, 3, 4, 5, 7, 11, 12, 13, 16, 17, 18, 19, 255, 65535]))
            _put(data, at + 2, value, 2, order)
        elif what == "ifd-count":
            value = int(rng.choice([0, 1, entry["count"] - 1, entry["count"] + 1, 2**31 - 1, 2**32 - 1,
                                    int(rng.integers(2, 10**6))]))
            _put(data, at + 4, value, word, order)
        elif what == "ifd-code":
            value = int(rng.choice([*_LAYOUT_TAGS, 0, 65535, int(rng.integers(0, 65536))]))
            _put(data, at, value, 2, order)
        else:
            value = int(rng.choice([0, 1, 2, 3, 7, 8, 16, 63, 65, 255, 65535, 2**31 - 1, 2**32 - 1, len(data),
                                    int(rng.integers(0, len(data)))]))
            _put(data, at + 4 + word, value, word, order)
        note = f"tag {entry['code']} at {at}: {value}"
    elif what in ("tile-offset", "tile-bytecount"):
        tile = layout["tiles"][int(rng.integers(len(layout["tiles"])))]
        if what == "tile-offset":
            value = int(rng.choice([0, 8, tile["offset"] + 1, tile["offset"] - 1, len(data) - 1, len(data) + 4096,
                                    2**31, 2**32 - 1, int(rng.integers(0, len(data)))]))
            _put(data, tile["offset_at"], value, tile["size"], order)
        else:
            value = int(rng.choice([0, 1, tile["bytes"] // 2, tile["bytes"] * 4, len(data), 2**31 - 1,
                                    2**32 - 1]))
            _put(data, tile["count_at"], value, tile["size"], order)
        note = f"tile at {tile['offset']}: {value}"
        tile_only = True
    elif what == "truncate":
        at = int(rng.integers(0, len(data)))
        note = f"at {at} of {len(data)}"
        del data[at:]
    elif what == "tile-data":
        tile = layout["tiles"][int(rng.integers(len(layout["tiles"])))]
        n = int(rng.integers(1, max(2, tile["bytes"])))
        start = tile["offset"] + int(rng.integers(0, max(1, tile["bytes"] - n)))
        data[start : start + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        note = f"{n} random bytes at {start}"
        tile_only = True
    elif what == "bitflip":
        spots = rng.integers(0, len(data), int(rng.integers(1, 9)))
        for at in spots:
            data[int(at)] ^= 1 << int(rng.integers(0, 8))
        note = f"{len(spots)} bits"
    else:  # description: OME-XML, the Aperio header
        return "description: " + _mutate_description(rng, path), False
    path.write_bytes(bytes(data))
    return f"{what}: {note}", tile_only


def _mutate_description(rng: np.random.Generator, path: Path) -> str:
    import re

    import tifffile

    with tifffile.TiffFile(path) as tif:
        text = tif.pages[0].description or ""
    if not text:
        return "none to damage"
    choice = int(rng.integers(5))
    if choice == 0 and text:
        text, note = text[: int(rng.integers(0, len(text)))], "truncated"
    elif choice == 1:
        numbers = list(re.finditer(r"\d+(\.\d+)?", text))
        if numbers:
            m = numbers[int(rng.integers(len(numbers)))]
            new = str(rng.choice(["0", "-1", "1e999", "nan", "99999999999", "x", ""]))
            text, note = text[: m.start()] + new + text[m.end() :], f"number {m.group()} -> {new!r}"
        else:
            note = "no number"
    elif choice == 2:
        words = re.findall(r'"([A-Za-z0-9]+)"', text)
        if words:
            old = str(rng.choice(words))
            new = str(rng.choice(["", "ZZZ", "float128", "XYZCT", "-5", "QQ"]))
            text, note = text.replace(f'"{old}"', f'"{new}"', 1), f"{old!r} -> {new!r}"
        else:
            note = "no attribute"
    elif choice == 3:
        text, note = "".join(chr(int(c)) for c in rng.integers(32, 127, int(rng.integers(1, 200)))), "random text"
    else:
        text, note = "Aperio Image Library |MPP = " + str(rng.choice(["0", "-0.5", "1e-300", "abc", "1e999"])), "MPP"
    tifffile.tiffcomment(path, text.encode("ascii", "replace"))
    return note


# --------------------------------------------------------------------------- mutators: zarr


_JUNK = (None, -1, 0, 2**63, 2**40, "x", "", [], {}, 1.5, True, [[]], [-1], "../escape", "0/../../../outside")


def _zarr_files(root: Path) -> tuple[list[Path], list[Path]]:
    metadata, chunks = [], []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            (metadata if path.name in ("zarr.json", ".zarray", ".zattrs", ".zgroup") else chunks).append(path)
    return metadata, chunks


def _leaves(value, prefix=()):
    """Every (path, value) in a JSON document, containers included."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*prefix, i))


def _set(doc, path, value):
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value


_DELETE = object()


def _multiscales(doc: dict) -> Optional[tuple[tuple, list]]:
    """Where the multiscales list is in a group's metadata document (v3 zarr.json or v2 .zattrs)."""
    for base in (("attributes", "ome"), ("attributes",), ("ome",), ()):
        node = doc
        try:
            for key in base:
                node = node[key]
        except (KeyError, TypeError):
            continue
        if isinstance(node, dict) and "multiscales" in node:
            return (*base, "multiscales"), node["multiscales"]
    return None


def mutate_zarr(rng: np.random.Generator, root: Path, what: Optional[str] = None) -> tuple[str, bool]:
    """Damage the zarr store at `root` in place; return what was done, and whether only chunks changed."""
    metadata, chunks = _zarr_files(root)
    level0 = [c for c in chunks if c.relative_to(root).parts[0] == "0"] or chunks
    what = what or str(rng.choice(["json-truncate", "json-garbage", "json-type", "json-delete", "axes", "multiscales",
                           "shape", "dtype", "chunk-grid", "codecs", "chunk-delete", "chunk-rename",
                           "chunk-corrupt"],
                          p=[.07, .04, .14, .07, .09, .1, .09, .07, .06, .05, .06, .05, .11]))
    if what.startswith("chunk-"):
        chunk = level0[int(rng.integers(len(level0)))]
        rel = chunk.relative_to(root).as_posix()
        if what == "chunk-delete":
            chunk.unlink()
        elif what == "chunk-rename":
            other = chunk.with_name(str(rng.choice(["9", "99", "x", "-1", "0.0"])))
            chunk.rename(other)
            rel += f" -> {other.name}"
        else:
            data = bytearray(chunk.read_bytes())
            if rng.random() < 0.3:
                del data[int(rng.integers(0, len(data))):]
            else:
                n = int(rng.integers(1, max(2, len(data))))
                at = int(rng.integers(0, max(1, len(data) - n)))
                data[at : at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            chunk.write_bytes(bytes(data))
        return f"{what}: {rel}", True
    if what in ("json-truncate", "json-garbage"):
        target = metadata[int(rng.integers(len(metadata)))]
        text = target.read_bytes()
        if what == "json-truncate":
            target.write_bytes(text[: int(rng.integers(0, len(text)))])
        else:
            target.write_bytes(bytes(rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8)))
        return f"{what}: {target.relative_to(root).as_posix()}", False
    group_docs = [m for m in metadata if m.name in ("zarr.json", ".zattrs") and _multiscales(_load(m))]
    array_docs = [m for m in metadata if m.name == ".zarray" or (m.name == "zarr.json" and
                                                                    _load(m).get("node_type") == "array")]
    array_docs = [m for m in array_docs if m.parent.name == "0"] or array_docs
    if what in ("axes", "multiscales") and group_docs:
        target = group_docs[0]
        doc = _load(target)
        where, ms = _multiscales(doc)
        note = _mutate_multiscales(rng, ms, what)
        if note == "delete":
            _set(doc, where, _DELETE)
        elif note == "empty":
            _set(doc, where, [])
    elif what in ("shape", "dtype", "chunk-grid", "codecs") and array_docs:
        target = array_docs[int(rng.integers(len(array_docs)))]
        doc = _load(target)
        note = _mutate_array_meta(rng, doc, what)
    else:
        target = metadata[int(rng.integers(len(metadata)))]
        doc = _load(target)
        places = [p for p, _ in _leaves(doc) if p]
        if not places:
            return f"{what}: nothing in {target.name}", False
        place = places[int(rng.integers(len(places)))]
        if what == "json-delete":
            _set(doc, place, _DELETE)
            note = f"del {'/'.join(map(str, place))}"
        else:
            value = _JUNK[int(rng.integers(len(_JUNK)))]
            _set(doc, place, value)
            note = f"{'/'.join(map(str, place))} = {value!r}"
    target.write_text(json.dumps(doc))
    return f"{what}: {target.relative_to(root).as_posix()}: {note}", False


def _load(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _mutate_multiscales(rng, ms: list, what: str) -> str:
    first = ms[0] if ms and isinstance(ms[0], dict) else {}
    axes = first.get("axes", [])
    if what == "axes":
        choice = int(rng.integers(6))
        if choice == 0 and axes:
            axes.pop(int(rng.integers(len(axes))))
            return "dropped an axis"
        if choice == 1 and axes:
            axes.append(dict(axes[-1]) if isinstance(axes[-1], dict) else axes[-1])
            return "duplicated an axis"
        if choice == 2 and axes:
            a = axes[int(rng.integers(len(axes)))]
            name = str(rng.choice(["q", "", "y", "t", "z", "channel", "X"]))
            if isinstance(a, dict):
                a["name"] = name
            return f"renamed an axis to {name!r}"
        if choice == 3:
            rng.shuffle(axes)
            return "shuffled"
        if choice == 4:
            first["axes"] = _JUNK[int(rng.integers(len(_JUNK)))]
            return f"axes = {first['axes']!r}"
        first["axes"] = [a["name"] if isinstance(a, dict) else a for a in axes]  # 0.3 style strings
        return "axes as strings"
    datasets = first.get("datasets", [])
    choice = int(rng.integers(7))
    if choice == 0:
        return "delete"
    if choice == 1:
        return "empty"
    if choice == 2:
        first["datasets"] = []
        return "no datasets"
    if choice == 3 and datasets:
        path = str(rng.choice(["9", "", "..", "../..", "/etc", "0/zarr.json", "1/../0"]))
        datasets[0]["path"] = path
        return f"dataset path {path!r}"
    if choice == 4 and datasets:
        scale = [rng.choice([0, -1, 1e308, float("nan"), "a"]) for _ in range(int(rng.integers(1, 5)))]
        datasets[0]["coordinateTransformations"] = [{"type": "scale", "scale": [_plain(v) for v in scale]}]
        return f"scale {scale}"
    if choice == 5 and datasets:
        datasets[0].pop("path", None)
        return "dataset without path"
    ms.insert(0, _JUNK[int(rng.integers(len(_JUNK)))])
    return f"first multiscale {ms[0]!r}"


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and (value != value) else value


def _mutate_array_meta(rng, doc: dict, what: str) -> str:
    v3 = "zarr_format" in doc and doc.get("zarr_format") == 3
    if what == "shape":
        shape = list(doc.get("shape", [3, 1, 1]))
        choice = int(rng.integers(6))
        if choice == 0:
            shape[int(rng.integers(len(shape)))] = int(rng.choice([2**40, 2**62]))
        elif choice == 1:
            shape[int(rng.integers(len(shape)))] = 0
        elif choice == 2:
            shape[int(rng.integers(len(shape)))] = -1
        elif choice == 3:
            shape = shape[1:]
        elif choice == 4:
            shape = [*shape, 2]
        else:
            shape = [n + int(rng.integers(1, 100)) for n in shape]
        doc["shape"] = shape
        return f"shape {shape}"
    if what == "dtype":
        dtype = str(rng.choice(["complex128", "bool", "float16", "<U4", "|O", "int64", "garbage", "|V8", ">f8",
                                "string", "uint64", "float64"]))
        doc["data_type" if v3 else "dtype"] = dtype
        return f"dtype {dtype}"
    if what == "chunk-grid":
        edges = [int(rng.choice([0, -1, 1, 2**40, 7])) for _ in doc.get("shape", [0, 0, 0])]
        if rng.random() < 0.2:
            edges = edges[1:]
        if v3:
            doc.setdefault("chunk_grid", {}).setdefault("configuration", {})["chunk_shape"] = edges
        else:
            doc["chunks"] = edges
        return f"chunks {edges}"
    if v3:
        codecs = doc.get("codecs", [])
        if codecs and rng.random() < 0.5:
            codecs.pop(int(rng.integers(len(codecs))))
            return "dropped a codec"
        doc["codecs"] = [*codecs, {"name": str(rng.choice(["nonsense", "gzip", "blosc", "transpose"])),
                                   "configuration": {"level": "x"}}]
        return "added a codec"
    doc["compressor"] = {"id": str(rng.choice(["nonsense", "zlib", "blosc"])), "level": "x"}
    return "compressor"


# --------------------------------------------------------------------------- mutators: models


class _Payload:
    """A pickled object whose unpickling would run code: create the marker file `path`."""

    def __init__(self, path: str, how: str) -> None:
        self.path, self.how = path, how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.path}",)
        if self.how == "exec":
            return exec, (f"open({self.path!r}, 'w').write('ran')",)
        return open, (self.path, "w")


def mutate_checkpoint(rng: np.random.Generator, path: Path, marker: Path,
                      what: Optional[str] = None) -> tuple[str, bool]:
    """Damage the checkpoint at `path` (or replace it with a hostile pickle that would create `marker`)."""
    import torch

    what = what or str(rng.choice(["pickle-code", "pickle-code", "plain-pickle", "script-name", "field", "state",
                           "zip-bytes", "truncate"]))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    how = str(rng.choice(["system", "exec", "open"]))
    if what == "pickle-code":
        where = str(rng.choice(["top", "config", "state_dict", "metadata"]))
        ckpt = {"payload": _Payload(str(marker), how)} if where == "top" else dict(ckpt)
        if where != "top":
            ckpt[where] = _Payload(str(marker), how)
        torch.save(ckpt, path)
        return f"{what}: {how} in {where}", False
    if what == "plain-pickle":
        path.write_bytes(pickle.dumps(_Payload(str(marker), how)))
        return f"{what}: {how}", False
    if what == "script-name":  # a zip whose member names make it look like TorchScript
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/constants.pkl", pickle.dumps(_Payload(str(marker), how)))
            archive.writestr("archive/data.pkl", pickle.dumps(_Payload(str(marker), how)))
            archive.writestr("archive/version", "3\n")
        return f"{what}: {how}", False
    if what == "field":
        key = str(rng.choice(["architecture", "config", "normalization", "state_dict", "format", "version"]))
        values = [_DELETE, None, "UNet2", 7, {"in_channels": -3}, {"bogus": 1}, [1, 2],
                  {"num_classes": 0, "in_channels": 3}, "x"]
        value = values[int(rng.integers(len(values)))]
        if value is _DELETE:
            ckpt.pop(key, None)
        else:
            ckpt[key] = value
        torch.save(ckpt, path)
        return f"{what}: {key} = {'<deleted>' if value is _DELETE else repr(value)}", False
    if what == "state":
        state = dict(ckpt["state_dict"])
        key = list(state)[int(rng.integers(len(state)))]
        choice = int(rng.integers(4))
        if choice == 0:
            del state[key]
        elif choice == 1:
            state[key] = torch.zeros(3, 1)
        elif choice == 2:
            state[key] = torch.full_like(state[key], float("nan"))
        else:
            state["extra.weight"] = torch.zeros(1)
        ckpt["state_dict"] = state
        torch.save(ckpt, path)
        return f"{what}: {key} ({choice})", False
    data = bytearray(path.read_bytes())
    if what == "truncate":
        at = int(rng.integers(0, len(data)))
        path.write_bytes(bytes(data[:at]))
        return f"{what}: at {at}", False
    spots = rng.integers(0, len(data), int(rng.integers(1, 20)))
    for at in spots:
        data[int(at)] = int(rng.integers(0, 256))
    path.write_bytes(bytes(data))
    return f"{what}: {len(spots)} bytes", False


def mutate_package(rng: np.random.Generator, path: Path, marker: Path,
                   what: Optional[str] = None) -> tuple[str, bool]:
    """Damage the bioimage.io package (zip) at `path` in place."""
    import hashlib

    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    rdf_name = next(n for n in members if n.endswith(("rdf.yaml", "bioimageio.yaml")))
    weights = next((n for n in members if n.endswith(".pt")), None)
    what = what or str(rng.choice(["evil-member", "sha256", "weights-bytes", "missing-weights", "rdf-garbage",
                           "weights-pickle", "missing-member"]))
    rdf = members[rdf_name].decode()
    extra: dict[str, bytes] = {}
    if what == "evil-member":
        name = str(rng.choice(["../evil", "../../evil", "/tmp/evil-abs", "sub/../../evil"]))
        extra[name] = b"evil"
        if rng.random() < 0.5 and weights:  # and point the description at it
            rdf = rdf.replace(weights, name)
        note = name
    elif what == "sha256":
        import re

        hashes = re.findall(r"[0-9a-f]{64}", rdf)
        old = hashes[int(rng.integers(len(hashes)))]
        rdf = rdf.replace(old, hashlib.sha256(old.encode()).hexdigest(), 1)
        note = old[:8]
    elif what == "weights-bytes" and weights:
        data = bytearray(members[weights])
        data[int(rng.integers(len(data)))] ^= 0xFF
        members[weights] = bytes(data)
        note = weights
    elif what == "missing-weights" and weights:
        del members[weights]
        note = weights
    elif what == "missing-member":
        name = str(rng.choice([n for n in members if n != rdf_name]))
        del members[name]
        note = name
    elif what == "weights-pickle" and weights:
        import torch

        buffer = io.BytesIO()
        torch.save({"payload": _Payload(str(marker), "system")}, buffer)
        members[weights] = buffer.getvalue()
        # The description's SHA-256 follows, so that only the pickle itself stands in the way.
        rdf = _rehash(rdf, weights, members[weights])
        note = "code in the state dict pickle, SHA-256 updated"
    else:
        rdf = rdf[: int(rng.integers(0, len(rdf)))] + str(rng.choice(["\n  - [", ": :", "\t\x00", "{{"]))
        what, note = "rdf-garbage", "truncated"
    members[rdf_name] = rdf.encode()
    path.unlink()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in {**members, **extra}.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return f"{what}: {note}", False


def _rehash(rdf: str, member: str, data: bytes) -> str:
    """`rdf` with the SHA-256 recorded next to `member` replaced by that of `data`."""
    import hashlib
    import re

    lines = rdf.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if member in line:
            for j in range(max(0, i - 3), min(len(lines), i + 4)):
                if re.search(r"sha256: [0-9a-f]{64}", lines[j]):
                    lines[j] = re.sub(r"[0-9a-f]{64}", hashlib.sha256(data).hexdigest(), lines[j])
                    break
    return "".join(lines)


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One fuzz case: which input to damage, and the seed of everything random about it."""

    index: int
    kind: str
    seed: int


@dataclass
class Result:
    """What one case did and how the CLI answered."""

    index: int
    kind: str
    seed: int
    mutation: str = ""
    command: str = ""
    outcome: str = ""
    code: Optional[int] = None
    seconds: float = 0.0
    message: str = ""


def plan_cases(seed: int, count: int, kinds: Sequence[str]) -> list[Case]:
    """`count` cases over `kinds` (shares as in `KINDS`), each with its own seed derived from `seed`."""
    weights = np.array([KINDS[k] for k in kinds], float)
    # Largest remainder: each kind gets its share of the cases, in a seeded order.
    exact = weights / weights.sum() * count
    n = np.floor(exact).astype(int)
    n[np.argsort(exact - n)[::-1][: count - n.sum()]] += 1
    order = np.repeat(np.arange(len(kinds)), n)
    np.random.default_rng([seed, 0]).shuffle(order)
    return [Case(i, kinds[int(k)], int(np.random.default_rng([seed, i + 1]).integers(2**31))) for i, k in
            enumerate(order)]


class _Timeout(BaseException):
    """Raised in the case's thread by the watchdog alarm (a BaseException: no handler swallows it)."""


def _alarm(signum, frame):
    raise _Timeout()


def _run_cli(argv: list[str]) -> tuple[int, str]:
    """`tilesegment.cli.main(argv)` with stdout and stderr captured; an exception that escapes is
    written to the captured stderr as a traceback (as the interpreter would)."""
    import traceback

    from .cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except _Timeout:
            raise
        except BaseException:
            traceback.print_exc()
            code = 1
    return code, err.getvalue()


def _failed_tiles(output: Path) -> int:
    try:
        import zarr

        return len(zarr.open_group(output, mode="r").attrs.get("tilesegment", {}).get("failed_tiles", []))
    except Exception:
        return 0


def classify(code: int, stderr: str, names: Sequence[str], output: Path, stray: list[str],
             side_effect: bool) -> tuple[str, str]:
    """The outcome of a finished case and the error line (or the first offending line)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("tilesegment: error:")]
    message = errors[0] if errors else (lines[-1] if lines else "")
    if side_effect:
        return "side-effect", message
    if "Traceback" in stderr:
        return "traceback", next(line for line in lines if "Traceback" in line) if not errors else message
    if stray:
        return "stray-file", ", ".join(stray)
    if code == 0:
        return ("skipped" if _failed_tiles(output) else "ok"), message
    if code not in (1, 2):
        return "other-exit", message
    if "rerun with --debug" in message:
        return "unexpected", message
    if len(errors) != 1:
        return "noisy", " | ".join(lines[:3])
    others = [line for line in lines if line not in errors and not line.startswith("tilesegment: ")
              and not line.startswith("[")]
    if others:
        return "noisy", " | ".join(others[:3])
    if not any(name in message for name in names):
        return "unnamed", message
    return f"exit{code}", message


def _copy(source: Path, folder: Path) -> Path:
    target = folder / source.name
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)
    return target


def _prepare(case: Case, rng: np.random.Generator, inputs: dict[str, Path], given: Path, output: Path,
             marker: Path) -> tuple[list[str], Path, str]:
    """Copy the case's input into `given`, damage it, and choose the command: (argv, damaged file, what)."""
    model, image = inputs["model"], inputs["image"]
    if case.kind == "checkpoint":
        target = _copy(model, given)
        mutation, tile_only = mutate_checkpoint(rng, target, marker)
        argv = ["info", str(image), "--model", str(target)] if rng.random() < 0.7 else \
            ["segment", str(image), str(output), "--model", str(target), "--tile-size", "64", "--quiet",
             "--device", "cpu"]
    elif case.kind == "bioimageio":
        target = _copy(inputs["bioimageio"], given)
        mutation, tile_only = mutate_package(rng, target, marker)
        argv = ["info", str(image), "--model", str(target)]
    else:
        target = _copy(inputs[case.kind], given)
        mutate = mutate_zarr if case.kind.startswith("zarr") else mutate_tiff
        mutation, tile_only = mutate(rng, target)
        verb = "info" if rng.random() < 0.25 else "segment"
        if verb == "info":
            argv = ["info", str(target)]
        else:
            # Tile damage mostly with --on-error skip (filled and recorded), a quarter with raise (exit 1).
            skip = rng.random() < (0.75 if tile_only else 0.3)
            argv = ["segment", str(target), str(output), "--model", str(model), "--tile-size", "64", "--quiet",
                    "--device", "cpu", "--on-error", "skip" if skip else "raise"]
            if case.kind == "shared-svs":  # the whole slide at 1/8 (every tile read, 8 x 8 fewer computed)
                argv += ["--mpp", "4"]
    return argv, target, mutation


def run_case(case: Case, inputs: dict[str, Path], work: Path, timeout: float = 20.0, keep: bool = False) -> Result:
    """Damage a copy of the case's input, run the CLI on it in a fresh folder, and sort the outcome."""
    rng = np.random.default_rng(case.seed)
    folder = work / f"case-{case.index:05d}"
    shutil.rmtree(folder, ignore_errors=True)
    given, here = folder / "in", folder / "run"
    given.mkdir(parents=True)
    here.mkdir()
    marker = folder / _MARK
    result = Result(case.index, case.kind, case.seed)
    model, image = inputs["model"], inputs["image"]
    output = here / "out.zarr"
    try:
        argv, target, mutation = _prepare(case, rng, inputs, given, output, marker)
    except Exception as exc:  # the fuzzer's own fault: one failed case, not a dead worker
        result.outcome, result.message = "harness", f"{type(exc).__name__}: {exc}"
        return result
    result.mutation = mutation
    names = [target.name]
    result.command = " ".join(a if a not in (str(target), str(output), str(model), str(image)) else
                              Path(a).name for a in argv)
    before = set(os.listdir(given))
    cwd = os.getcwd()
    os.chdir(here)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    start = time.perf_counter()
    try:
        code, stderr = _run_cli(argv)
    except _Timeout:
        code, stderr = None, ""
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(cwd)
    result.seconds = round(time.perf_counter() - start, 3)
    result.code = code
    if code is None:
        result.outcome, result.message = "hang", f"no answer within {timeout:g} s"
    else:
        stray = [f"run/{n}" for n in os.listdir(here) if n != output.name]
        stray += [f"in/{n}" for n in set(os.listdir(given)) - before]
        stray += [f"{n}" for n in os.listdir(folder) if n not in ("in", "run", _MARK)]
        stray += [p.name for p in work.iterdir() if p.name.startswith("evil")]
        if code == 2 and output.exists():
            stray.append("run/out.zarr (an input error left an output)")
        result.outcome, result.message = classify(code, stderr, names, output, stray, marker.exists())
        if result.outcome in BAD and not result.message:
            result.message = stderr[-2000:]
        elif result.outcome == "traceback":
            result.message = stderr[-3000:]
    if not keep or result.outcome not in BAD:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def count_outcomes(results: Iterable[Result]) -> dict[str, int]:
    """How many results had each outcome."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- the worker and its driver


def _worker(argv: Sequence[str]) -> None:
    """``python -m tilesegment._fuzz SPEC.json``: run the cases of the spec from its ``start``,
    writing one JSON line before (``{"start": i}``) and after each case to the original stdout."""
    spec = json.loads(Path(argv[0]).read_text())
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # whatever a library prints to fd 1 must not mix with the results
    import torch

    torch.set_num_threads(1)
    inputs = {k: Path(v) for k, v in spec["inputs"].items()}
    work = Path(spec["work"])
    crash_at = int(os.environ.get("TILESEGMENT_FUZZ_CRASH_AT", -1))  # tests of the harness itself
    for raw in spec["cases"][spec["start"]:]:
        case = Case(**raw)
        channel.write(json.dumps({"start": case.index}) + "\n")
        if case.index == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        result = run_case(case, inputs, work, spec["timeout"], spec["keep"])
        channel.write(json.dumps(asdict(result)) + "\n")


def run_cases(cases: Sequence[Case], inputs: dict[str, Path], work: Path, timeout: float = 20.0,
              keep: bool = False, on_result: Optional[Callable[[Result], None]] = None) -> list[Result]:
    """Run `cases` in a worker process, restarting it after a crash (``crash``) or a case that does
    not answer within `timeout` + 10 s (``hang``, when even the in-process alarm could not stop it)."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "spec.json"
    results: list[Result] = []
    start = 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          *filter(None, [os.environ.get("PYTHONPATH")])])}
    while start < len(cases):
        spec_path.write_text(json.dumps({"inputs": {k: str(v) for k, v in inputs.items()}, "work": str(work),
                                         "cases": [asdict(c) for c in cases], "start": start,
                                         "timeout": timeout, "keep": keep}))
        proc = subprocess.Popen([sys.executable, "-m", "tilesegment._fuzz", str(spec_path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work)
        lines: "queue.Queue[Optional[str]]" = queue.Queue()
        errors: list[str] = []
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
        threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
        current, deadline = None, time.monotonic() + 120  # the first case waits for the imports
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                proc.kill()
                proc.wait()
                line = "hang"
            if line is None or line == "hang":
                proc.wait()
                if current is None:
                    if start >= len(cases) or line is None and proc.returncode == 0:
                        start = len(cases)
                        break
                    raise RuntimeError(f"the fuzz worker failed before a case: {''.join(errors)[-3000:]}")
                case = cases[current]
                outcome = "hang" if line == "hang" else "crash"
                result = Result(case.index, case.kind, case.seed, outcome=outcome, code=proc.returncode,
                                message=f"worker {'killed' if line == 'hang' else 'died'} "
                                        f"(returncode {proc.returncode}): {''.join(errors)[-1500:]}")
                results.append(result)
                if on_result:
                    on_result(result)
                start = current + 1
                break
            record = json.loads(line)
            if set(record) == {"start"}:
                current = next(i for i, c in enumerate(cases) if c.index == record["start"])
                deadline = time.monotonic() + timeout + 10
                continue
            result = Result(**record)
            results.append(result)
            if on_result:
                on_result(result)
            current = None
            deadline = time.monotonic() + 60
        proc.stdout.close()
        proc.stderr.close()
    return results


if __name__ == "__main__":
    _worker(sys.argv[1:])
