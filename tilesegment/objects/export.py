"""What `label_objects` returns: the instance labels, a table per object, outlines and QuPath GeoJSON.

`Objects` holds the merged numbers of every object (`tilesegment._components.Merged`),
never the pixels: the table is built from them, and the outlines are traced
from the instance labels chunk by chunk when asked for.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from .._components import Merged
from ..errors import OutputExistsError, UsageError
from ..report import TqdmReporter
from .input import Input

__all__ = ["Objects", "files_beside"]


def files_beside(output: Union[str, os.PathLike]) -> tuple[Path, Path]:
    """Where ``segment --objects`` puts the table and the GeoJSON of `output`: beside it,
    named after it (``slide.zarr`` -> ``slide.objects.csv``, ``slide.geojson.gz``); the
    napari reader looks for the table there.

    >>> [p.name for p in files_beside("runs/slide.ome.zarr")]
    ['slide.objects.csv', 'slide.geojson.gz']
    """
    out = Path(output)
    stem = out.name[:-len(".ome.zarr")] if out.name.endswith(".ome.zarr") else out.stem
    return out.with_name(f"{stem}.objects.csv"), out.with_name(f"{stem}.geojson.gz")


class Objects:
    """The objects of a label map: instance labels, a table, and exports.

    Attributes
    ----------
    labels : numpy.ndarray or zarr.Array
        Object ids, 0 background, 1..N (uint32; uint64 beyond 2**32 - 1 objects).
    table : pandas.DataFrame
        One row per object, ordered by id: ``id``, ``class``, ``class_name``,
        ``area`` (pixels or voxels) and ``area_um2`` (2-D; ``volume_um3`` in 3-D)
        when the pixel size is known, ``centroid_[z]y/x`` and the box
        ``bbox_[z0]y0/x0/[z1]y1/x1`` (end exclusive) in full-resolution pixels,
        and ``mean_probability`` of the object's class when the map came with
        probabilities.
    class_names, class_colours : dict
        Name and RGB colour per class value (from the segment output's metadata).
    pixel_size : tuple of float or None
        Micrometres per pixel along the spatial axes.
    recipe : tilesegment.options.InstanceRecipe or None
        The recorded instance recipe `label_objects` followed, when it was
        given no classes and no growth of its own.
    steps : tuple of str
        Names of the chunk steps that ran over the instance labels after the
        numbering (the growth, ``grow3``, and `label_objects`' ``steps``).
        The table, outlines and GeoJSON describe the labels as written, after
        the steps; the objects then also have ``pixels_<class>`` columns,
        their pixels of each class (a grown nucleus: its seed class and the
        boundary class it grew into).
    """

    def __init__(self, labels: Any, merged: Merged, inp: Input, steps: Sequence[str] = ()) -> None:
        self.labels = labels
        self.steps = tuple(steps)
        self.recipe = None
        self.ndim = inp.ndim
        self.pixel_size = inp.pixel_size
        self._grid = inp.grid
        self._merged = merged
        present = [int(k) for k in np.unique(merged.classes[merged.area > 0])]
        names = {k: inp.names.get(k, f"class {k}") for k in present}
        self.class_names = {**inp.names, **names}
        from ..io.sinks import palette

        default = palette(max(present, default=0) + 1)
        self.class_colours = {k: inp.colours.get(k, tuple(default[k][:3])) for k in present}
        self.table = self._table()

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return f"Objects({len(self)} objects, labels {tuple(self.labels.shape)} {self.labels.dtype})"

    def _table(self):
        import pandas as pd

        m, d = self._merged, self.ndim
        axes = "zyx"[3 - d:]
        cols: dict[str, Any] = {
            "id": np.arange(1, m.n_objects + 1, dtype=np.int64),
            "class": m.classes,
            "class_name": _names(pd, m.classes, self.class_names),
            "area": m.area,
        }
        if self.pixel_size is not None:
            unit = float(np.prod(self.pixel_size))
            cols["area_um2" if d == 2 else "volume_um3"] = m.area * unit
        for i, a in enumerate(axes):
            cols[f"centroid_{a}"] = m.centroid[:, 3 - d + i]
        for i, a in enumerate(axes):
            cols[f"bbox_{a}0"] = m.lo[:, 3 - d + i]
        for i, a in enumerate(axes):
            cols[f"bbox_{a}1"] = m.hi[:, 3 - d + i]
        if m.mean_probability is not None:
            cols["mean_probability"] = m.mean_probability
        if m.votes is not None:
            for k in np.flatnonzero(m.votes.any(axis=0)):
                name = "".join(c if c.isalnum() else "_" for c in str(self.class_names.get(int(k), f"class {k}")))
                cols[f"pixels_{name.lower()}"] = m.votes[:, k]
        table = pd.DataFrame(cols)
        # a step may remove objects: their ids are left out (ids keep the numbering's)
        return table[table["area"] > 0].reset_index(drop=True) if (m.area == 0).any() else table

    def to_table(self, path: Union[str, os.PathLike], overwrite: bool = False) -> Path:
        """Write the table as CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``, needs pyarrow)."""
        path = _new_file(path, overwrite)
        name = path.name.lower()
        tmp = path.with_name(f".{path.name}.tmp")  # renamed when whole: never half a table
        try:
            if name.endswith(".parquet"):
                try:
                    import pyarrow  # noqa: F401
                except ImportError:
                    raise UsageError("Parquet needs pyarrow: pip install pyarrow, or write .csv") from None
                self.table.to_parquet(tmp, index=False)
            elif name.endswith((".csv", ".csv.gz", ".tsv")):
                # gzip without a time stamp: the same table gives the same bytes
                compression = {"method": "gzip", "mtime": 0} if name.endswith(".gz") else None
                self.table.to_csv(tmp, index=False, sep="\t" if name.endswith(".tsv") else ",",
                                  compression=compression)
            else:
                raise UsageError(f"table {str(path)!r}: use a .csv, .csv.gz, .tsv or .parquet name")
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def outlines(self) -> Iterator[tuple[int, Any]]:
        """Yield ``(id, shapely geometry)`` per object (2-D), chunk by chunk.

        The outline follows pixel edges in full-resolution pixel coordinates
        (x = column, y = row), holes included; its area is the pixel count.
        An object joined only diagonally (connectivity 2) is a MultiPolygon.
        """
        from .._polygons import iter_outlines

        if self.ndim != 2:
            raise UsageError("outlines and GeoJSON are for 2-D maps; a 3-D map has labels and a table only")
        yield from iter_outlines(self.labels, self._grid, self._merged.hi[:, 1:])

    def to_geojson(
        self,
        path: Union[str, os.PathLike],
        *,
        overwrite: bool = False,
        annotation_classes: Sequence[int] = (),
        annotation_min_area: Optional[int] = 100_000,
        scale: float = 1.0,
        progress: bool = False,
    ) -> Path:
        """Write a QuPath-ready GeoJSON FeatureCollection (gzipped when `path` ends in ``.gz``).

        One feature per object: its outline (holes kept, also across chunks)
        in full-resolution pixel coordinates; ``properties.objectType``
        ``"detection"``, or ``"annotation"`` for classes in
        `annotation_classes` and objects of at least `annotation_min_area`
        pixels (None: never by size); ``properties.classification``
        ``{name, color}`` from the model's classes; ``properties.measurements``
        from the table. Features are streamed to the file as their objects
        are complete. `scale` multiplies the coordinates (the downsample of
        the segmented level, when that was not full resolution).
        """
        path = _new_file(path, overwrite)
        if self.ndim != 2:
            raise UsageError("GeoJSON is for 2-D maps; a 3-D map has labels and a table only")
        import shapely

        rows = self.table
        measure = [c for c in rows.columns if c not in ("id", "class", "class_name")]
        values = rows[measure].to_numpy(np.float64)
        row_of = np.full(self._merged.n_objects + 1, -1, np.int64)  # rows are the objects present
        row_of[rows["id"].to_numpy()] = np.arange(len(rows))
        annotate = {int(k) for k in annotation_classes}
        tmp = path.with_name(f".{path.name}.tmp")
        bar = TqdmReporter(progress, unit="object")
        bar.start(len(self), "objects: GeoJSON")
        try:
            with _text_file(tmp, gz=path.name.lower().endswith(".gz")) as out:
                out.write('{"type": "FeatureCollection", "features": [\n')
                for n, (oid, geometry) in enumerate(self.outlines()):
                    if scale != 1.0:
                        geometry = shapely.transform(geometry, lambda xy: xy * scale)
                    k = int(self._merged.classes[oid - 1])
                    area = int(self._merged.area[oid - 1])
                    big = annotation_min_area is not None and area >= annotation_min_area
                    props = {
                        "objectType": "annotation" if k in annotate or big else "detection",
                        "name": f"{self.class_names.get(k, k)} {oid}",
                        "classification": {"name": self.class_names.get(k, f"class {k}"),
                                           "color": list(self.class_colours.get(k, (255, 0, 0)))},
                        "measurements": {"Object ID": oid,
                                         **{c: _number(v) for c, v in zip(measure, values[row_of[oid]])}},
                    }
                    out.write(("" if n == 0 else ",\n") + '{"type": "Feature", "geometry": '
                              + shapely.to_geojson(geometry) + ', "properties": ' + json.dumps(props) + "}")
                    bar.advance(1)
                out.write("\n]}\n")
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # no half-written file left beside the output
            raise
        finally:
            bar.close()
        return path


@contextlib.contextmanager
def _text_file(path: Path, gz: bool) -> Iterator[Any]:
    """`path` opened for UTF-8 text; with `gz`, gzipped with neither a file name nor a time
    stamp in the header, so that the same text gives the same bytes (a resumed run's
    GeoJSON equals an uninterrupted run's)."""
    if not gz:
        with open(path, "w", encoding="utf-8") as out:
            yield out
        return
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed, \
            io.TextIOWrapper(packed, encoding="utf-8") as out:
        yield out


def _names(pd: Any, classes: np.ndarray, names: dict) -> Any:
    """The class name of each object, as a categorical built from codes (one name per class,
    not per object: tables have millions of rows)."""
    values, codes = np.unique(classes, return_inverse=True)
    labels = [names.get(int(k), f"class {k}") for k in values]
    unique = list(dict.fromkeys(labels))  # two classes may share a name
    codes = np.asarray([unique.index(n) for n in labels], np.int64)[codes] if len(values) else codes
    return pd.Categorical.from_codes(codes, unique)


def _number(v: float):
    return int(v) if float(v).is_integer() else round(float(v), 4)


def _new_file(path: Union[str, os.PathLike], overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{str(path)!r} exists; pass overwrite=True (CLI: --overwrite) or another path")
    if not path.parent.exists():
        raise UsageError(f"folder {str(path.parent)!r} does not exist; create it first")
    return path

