"""The completion manifest of an output: what run wrote it and which blocks are on disk.

Inside an OME-Zarr output being written, ``.tilesegment/run.json`` holds the
run's identity (input, model hash, tile size, mode, ...) and
``.tilesegment/done/<block>`` is an empty file created only after that
block's chunks are written, so a killed run can be resumed exactly where it
stopped. On a local disk the chunks are fsynced before the marker is created
and the marker is fsynced with its folder (`tilesegment.io.durable`), so a
marker survives a power loss only with its chunks; on an object store the
marker is PUT after every PUT of the block's chunks returned. When the run
completes, the record moves into the group's attributes (``tilesegment``) and
the folder is removed.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import UsageError
from . import durable

__all__ = ["Manifest", "model_hash", "input_identity"]

_FOLDER = ".tilesegment"


def model_hash(model: Any) -> str:
    """The resume identity of a model: ``describe(model).identity()`` (`tilesegment.models.describe`)."""
    from ..models.base import describe

    return describe(model).identity()


def input_identity(image: Any, source) -> dict:
    """What identifies the input: file name and size, or array shape and dtype."""
    from .remote import is_url, url_name

    ident = {"shape": list(source.shape), "channels": source.channels, "dtype": str(source.dtype)}
    if is_url(image):
        ident["name"] = url_name(image)
        ident["bytes"] = None  # a request per check; name, shape and dtype tell slides apart
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        ident["name"] = path.name
        ident["bytes"] = path.stat().st_size if path.is_file() else None
    return ident


class Manifest:
    """Completion records of one output: a local folder or a URL (``s3://...``).

    Remote outputs keep the same objects under the same keys, written with
    fsspec (``storage_options`` as for the output itself).
    """

    def __init__(self, output: Union[os.PathLike, str], storage_options: Optional[dict] = None) -> None:
        from .remote import filesystem, is_url, join

        self._local = not is_url(output)
        if not self._local:
            self._fs, root = filesystem(output, storage_options)
        else:
            from fsspec.implementations.local import LocalFileSystem

            self._fs, root = LocalFileSystem(), os.fspath(Path(output).absolute())
        self._root = None if is_url(output) else Path(root)
        self.folder = join(root, _FOLDER)
        self._run = join(self.folder, "run.json")
        self._done = join(self.folder, "done")

    def _fresh(self) -> None:
        # Object-store filesystems cache listings; another process may have written since.
        self._fs.invalidate_cache(self.folder)

    @property
    def exists(self) -> bool:
        self._fresh()
        return self._fs.isfile(self._run)

    def start(self, record: dict) -> None:
        """Begin a run: write its identity, with no block done.

        A local output that does not exist yet is created here, atomically,
        with its manifest inside: built in a hidden sibling and renamed. A run
        killed at any moment after that leaves a folder that ``--resume``
        continues; before it, nothing (a stale sibling, removed by the next
        run). On object stores each object appears whole.
        """
        text = json.dumps(record, indent=1, sort_keys=True).encode()
        if self._root is not None and not self._root.exists():
            tmp = self._root.with_name(f".{self._root.name}.{uuid.uuid4().hex[:8]}.tmp")
            os.makedirs(tmp / _FOLDER / "done")
            durable.write_synced(tmp / _FOLDER / "run.json", text)
            durable.sync_files([], [tmp / _FOLDER / "done", tmp / _FOLDER, tmp])
            os.rename(tmp, self._root)
            durable.sync_files([], [self._root.parent])
            return
        self._fs.makedirs(self._done, exist_ok=True)  # a no-op on object stores
        if self._local:  # never a half-written run.json (it would block --resume), and durable
            tmp = f"{self._run}.{uuid.uuid4().hex[:8]}.tmp"
            durable.write_synced(tmp, text)
            os.replace(tmp, self._run)
            root = os.path.dirname(self.folder)
            durable.sync_files([], [self._done, self.folder, root, os.path.dirname(root)])
        else:
            self._fs.pipe_file(self._run, text)

    def _put(self, path: str, data: bytes) -> None:
        """Write a small file: fsynced with its folder on a local disk, one PUT on an object store."""
        if self._local:
            durable.write_synced(path, data)
        else:
            self._fs.pipe_file(path, data)

    def reopen(self) -> None:
        """Continue a stopped run: its markers folder may be gone (stopped while finishing)."""
        self._fs.makedirs(self._done, exist_ok=True)

    def record(self) -> dict:
        return json.loads(self._fs.cat_file(self._run))

    def mark_done(self, block: int, failed_tiles: Optional[list] = None) -> None:
        """Record `block` as written (with its unreadable tiles).

        Call only once its chunks are stored: on a local disk, written and fsynced
        (`tilesegment.io.durable.sync_region`); on an object store, every PUT returned.
        """
        if failed_tiles:  # beside the marker, so that finishing reads only these
            self._put(f"{self._done}/{int(block)}.failed", json.dumps(failed_tiles).encode())
        self._put(f"{self._done}/{int(block)}", b"")

    def failed_tiles(self) -> list:
        """Unreadable tiles recorded with the finished blocks, in block order."""
        failed = sorted(int(n.split(".")[0]) for n in self._names() if n.endswith(".failed"))
        return [tile for block in failed for tile in json.loads(self._fs.cat_file(f"{self._done}/{block}.failed"))]

    def done_blocks(self) -> np.ndarray:
        return np.array(sorted(int(n) for n in self._names() if n.isdigit()), np.int64)

    def _names(self) -> list[str]:
        # One listing, not a read per block: a volume may have hundreds of thousands of blocks.
        self._fresh()
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self._fs.ls(self._done, detail=False)]
        except FileNotFoundError:
            return []

    def check_matches(self, record: dict, output: os.PathLike) -> None:
        """Refuse to resume a run whose settings differ from `record`."""
        previous = self.record()
        first = ["input", "model", "mode", "tile_size"]
        for key in first + sorted((set(previous) | set(record)) - set(first)):
            if previous.get(key) != record.get(key):
                raise UsageError(
                    f"cannot resume {str(output)!r}: {key} was {previous.get(key)!r}, now "
                    f"{record.get(key)!r}; rerun with the same settings, or --overwrite to start again"
                )

    def finish(self) -> Optional[dict]:
        """Remove the markers; return the run record for the output's attributes."""
        if not self.exists:
            return None
        record = self.record()
        # run.json goes last: a run killed while the markers are removed is still resumable
        # (it redoes the blocks whose markers are gone), never a finished output with debris.
        if self._fs.exists(self._done):
            self._fs.rm(self._done, recursive=True)
        self._fs.rm_file(self._run)
        if self._fs.exists(self.folder):  # other files of the run (object stores have no folders)
            self._fs.rm(self.folder, recursive=True)
        if self._local:
            durable.sync_files([], [os.path.dirname(self.folder)])
        self._fresh()
        return record
