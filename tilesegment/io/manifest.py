"""The completion manifest of an output: what run wrote it and which blocks are on disk.

Inside an OME-Zarr output being written, ``.tilesegment/run.json`` holds the
run's identity (input, model hash, tile size, mode, ...) and
``.tilesegment/done/<block>`` is an empty file created only after that
block's chunks are written, so a killed run can be resumed exactly where it
stopped. When the run completes, the record moves into the group's
attributes (``tilesegment``) and the folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import UsageError

__all__ = ["Manifest", "model_hash", "input_identity"]

_FOLDER = ".tilesegment"


def model_hash(model: Any) -> str:
    """SHA-256 of a module's architecture name and weights (first 16 hex digits)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def input_identity(image: Any, source) -> dict:
    """What identifies the input: file name and size, or array shape and dtype."""
    ident = {"shape": list(source.shape), "channels": source.channels, "dtype": str(source.dtype)}
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        ident["name"] = path.name
        ident["bytes"] = path.stat().st_size if path.is_file() else None
    return ident


class Manifest:
    """Completion records of one output folder."""

    def __init__(self, output: os.PathLike) -> None:
        self.folder = Path(output) / _FOLDER
        self._done = self.folder / "done"

    @property
    def exists(self) -> bool:
        return (self.folder / "run.json").is_file()

    def start(self, record: dict) -> None:
        """Begin a run: write its identity, with no block done."""
        self._done.mkdir(parents=True, exist_ok=True)
        (self.folder / "run.json").write_text(json.dumps(record, indent=1, sort_keys=True))

    def record(self) -> dict:
        return json.loads((self.folder / "run.json").read_text())

    def mark_done(self, block: int, failed_tiles: Optional[list] = None) -> None:
        """Record `block` as written (with its unreadable tiles). Call only after its chunks are on disk."""
        (self._done / str(int(block))).write_text(json.dumps(failed_tiles or []))

    def failed_tiles(self) -> list:
        """Unreadable tiles recorded with the finished blocks, in block order."""
        found = []
        for block in self.done_blocks():
            text = (self._done / str(int(block))).read_text()
            found.extend(json.loads(text) if text else [])
        return found

    def done_blocks(self) -> np.ndarray:
        if not self._done.is_dir():
            return np.zeros(0, np.int64)
        return np.array(sorted(int(p.name) for p in self._done.iterdir() if p.name.isdigit()), np.int64)

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
        for marker in self._done.iterdir() if self._done.is_dir() else ():
            marker.unlink()
        if self._done.is_dir():
            self._done.rmdir()
        (self.folder / "run.json").unlink()
        self.folder.rmdir()
        return record
