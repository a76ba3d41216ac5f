"""The life-cycle of an OME-Zarr output in one place: check, resume, create, say what was saved.

`segment()`, the `Stitcher`, the distributed runner and the CLI all go
through an `Output`; `ZarrSink` does the writing (chunks, manifest, pyramid,
the swap of an overwritten output), `Manifest` the completion records and
`OutputLock` the one-writer rule (`Job.run` holds it while it writes).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import OutputExistsError, TileSegmentError, UsageError
from .lock import OutputLock
from .manifest import Manifest
from .remote import is_url
from .sinks import ZarrSink, _store_has_group, check_ngff, is_local_path

__all__ = ["Output"]


@dataclass(frozen=True)
class Output:
    """Where a run writes and how it treats what is there.

    Parameters
    ----------
    target : path, URL or zarr store
        The OME-Zarr to write.
    overwrite : bool
        Replace an existing output (written beside it and swapped in when
        complete; stores and URLs are cleared when the run starts).
    resume : bool
        Continue an output that a stopped run of the same settings left.
    ngff : {"0.5", "0.4"}
        OME-Zarr version.
    storage_options : dict, optional
        fsspec options of a URL target.
    pixel_size : tuple of float, optional
        Micrometres per pixel (voxel) along each plan axis, ``(y, x)`` or
        ``(z, y, x)``, for the OME-Zarr metadata.
    class_names : sequence of str, optional
        Names of the classes, recorded in the output (``tilesegment.classes``)
        for `label_objects`, QuPath and napari.
    instances : dict, optional
        The model's instance recipe (`tilesegment.options.InstanceRecipe.to_dict`),
        recorded in the output (``tilesegment.instances``) for `label_objects`.
    source : dict, optional
        Where the pixels came from: ``{"path": ..., "level": ..., ...}`` (the
        file's absolute path or URL and the `open_image` options), recorded
        in the output (``tilesegment.source``) so that a viewer can open the
        image beside the result. Not part of the run's identity: a moved
        slide still resumes.
    record : dict, optional
        Identity of the run, kept in the output's manifest for `resume`.
    writers : int
        Threads that compress and write finished blocks.
    locked : bool
        The caller holds this output's `lock` (as `Job.run` does while it
        writes), so `check` does not take it for another run's.
    """

    target: Any
    overwrite: bool = False
    resume: bool = False
    ngff: str = "0.5"
    storage_options: Optional[dict] = None
    pixel_size: Optional[tuple[float, ...]] = None
    class_names: Optional[Sequence[str]] = None
    instances: Optional[dict] = None
    source: Optional[dict] = None
    record: Optional[dict] = None
    writers: int = 2
    locked: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ngff", check_ngff(self.ngff))
        if self.resume and self.overwrite:
            raise UsageError("resume and overwrite exclude each other: resume continues an output, "
                             "overwrite replaces it")

    @property
    def _exists(self) -> bool:
        if is_url(self.target):
            return _store_has_group(self.target, self.storage_options)
        return is_local_path(self.target) and os.path.exists(self.target)

    @property
    def _recorded(self) -> bool:
        """Whether runs into this target keep a manifest (local paths and URLs, not stores)."""
        return is_local_path(self.target) or is_url(self.target)

    def lock(self, command: str = "segment") -> Optional[OutputLock]:
        """The lock a run must hold while it writes this output (`tilesegment.io.lock`); None
        for zarr stores given as objects, which have no name to put a lock beside."""
        if not self._recorded:
            return None
        return OutputLock(self.target, self.storage_options, command)

    def check(self, image: Any = None) -> None:
        """Refuse, before any work, an output that another live run writes, one that exists
        (without `overwrite` or a run to resume), a folder that cannot be written, or one
        that is the input `image`."""
        lock = None if self.locked else self.lock()
        if lock is not None:
            lock.check()
        try:
            self._check_target()
        except TileSegmentError:
            if lock is not None:
                lock.check()  # a run that started meanwhile: name it rather than what it wrote
            raise
        if isinstance(image, (str, os.PathLike)) and isinstance(self.target, (str, os.PathLike)):
            a, b = Path(image).resolve(), Path(self.target).resolve()
            if a == b or a in b.parents or b in a.parents:
                raise UsageError(
                    f"output {str(self.target)!r} is (or contains, or is inside) the input {str(image)!r}; "
                    "write the result somewhere else"
                )

    def _check_target(self) -> None:
        if self.resume and self._recorded and Manifest(self.target, self.storage_options).exists:
            pass  # a stopped run to continue
        elif self.resume and self._exists:
            raise UsageError(f"{str(self.target)!r} has no unfinished run to resume (it is complete or not "
                             "ours); use another output, or --overwrite to replace it")
        elif not self.overwrite and self._recorded and self._exists and Manifest(
                self.target, self.storage_options).exists:
            raise OutputExistsError(
                f"{str(self.target)!r} holds a run that stopped before it finished; pass resume=True "
                "(CLI: --resume) to finish it, or overwrite=True (CLI: --overwrite) to start again"
            )
        else:
            ZarrSink.check_output(self.target, self.overwrite, self.storage_options)

    def done_blocks(self, record: dict) -> Optional[np.ndarray]:
        """Blocks an earlier run with the same `record` finished, when resuming; None when
        the run starts afresh.

        Raises
        ------
        UsageError
            If the earlier run had other settings.
        """
        manifest = Manifest(self.target, self.storage_options)
        if self.resume and manifest.exists:
            manifest.check_matches(record, self.target)
            return manifest.done_blocks()
        return None

    def check_space(self, need: float, what: str) -> None:
        """Refuse a local output whose folder has less than `need` bytes free (`what` says
        what is written, for the message)."""
        if not is_local_path(self.target):
            return
        folder = Path(self.target).resolve().parent
        free = shutil.disk_usage(folder).free
        if need > free:
            raise UsageError(
                f"output needs about {need / 1e9:.1f} GB ({what}), but only {free / 1e9:.1f} GB are "
                f"free in {str(folder)!r}; free space or write elsewhere"
            )

    def sink(
        self,
        shape: tuple[int, ...],
        dtype: np.dtype,
        chunks: tuple[int, ...],
        *,
        names: Sequence[str],
        labels: Optional[int] = None,
    ) -> ZarrSink:
        """Create the OME-Zarr (or reopen it, when resuming) and return its sink: an array of
        `shape` and `dtype` in `chunks`, axes `names`, a label image of `labels` values if given."""
        return ZarrSink(self.target, shape, dtype, chunks, overwrite=self.overwrite,
                        pixel_size=self.pixel_size, writers=self.writers, labels=labels, record=self.record,
                        resume=self.resume, ngff=self.ngff, storage_options=self.storage_options,
                        dimension_names=tuple(names), class_names=self.class_names,
                        instances=self.instances, source=self.source)

    def saved_blocks(self) -> int:
        """Blocks a stopped run left saved for ``resume`` (0 when none, or nothing to resume)."""
        if not self._recorded:
            return 0
        manifest = Manifest(self.target, self.storage_options)
        return len(manifest.done_blocks()) if manifest.exists else 0
