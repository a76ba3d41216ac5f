"""Making what a run wrote on a local disk survive a power loss: fsync files, then their folders.

A completion marker (`tilesegment.io.manifest`) may promise a block only once
the block's chunks are on the disk itself, not in the page cache. zarr's
`LocalStore` writes each chunk whole into a temporary file and renames it into
place (atomic against a kill, not against a power loss), and never syncs; so
after a block's chunks are written, `sync_region` opens each of its chunk files
and fsyncs it, then fsyncs each folder that holds them once (the renames are
entries of those folders). Only then is the marker created (and fsynced, with
the ``done/`` folder). The cost is a few syncs per block, not per pixel:
``benchmarks/fsync.py`` measures it (docs/benchmarks.md).

Object stores need none of this: a PUT that returned is stored.

``TILESEGMENT_FSYNC=0`` in the environment, or ``ENABLED = False`` here,
turns the syncs off. It is a knob for benchmarks and tests, not for users:
without the syncs a power loss can leave markers for blocks whose chunks are
empty or missing, and ``--resume`` would trust them.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Union

__all__ = ["ENABLED", "fsync_file", "fsync_folder", "sync_files", "sync_region", "sync_tree", "sync_metadata",
           "write_synced"]

#: Whether files are fsynced (read once from ``TILESEGMENT_FSYNC``; benchmarks set it directly).
ENABLED = os.environ.get("TILESEGMENT_FSYNC", "1").strip().lower() not in ("0", "false", "no", "off")

PathLike = Union[str, os.PathLike]


def fsync_file(path: PathLike) -> None:
    """Flush the file at `path` to the disk (opened read-only: Linux syncs the inode, not the handle)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path: PathLike) -> None:
    """Flush the entries of the folder at `path` (files created or renamed into it)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform that cannot open folders (Windows): entries are synced with files
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; nothing more can be done there
        pass
    finally:
        os.close(fd)


def sync_files(paths: Iterable[PathLike], folders: Iterable[PathLike] = ()) -> None:
    """fsync every file of `paths` that exists, then each folder holding one, and `folders`, once.

    Files that do not exist are skipped: zarr writes no file for a chunk it
    finds to be all fill value when so configured.
    """
    if not ENABLED:
        return
    parents: dict[str, None] = {}
    for path in paths:
        try:
            fsync_file(path)
        except FileNotFoundError:
            continue
        parents[os.path.dirname(os.fspath(path))] = None
    for folder in folders:
        parents[os.fspath(folder)] = None
    for folder in parents:
        fsync_folder(folder)


def write_synced(path: PathLike, data: bytes) -> None:
    """Create (or replace) the file at `path` with `data` and fsync it and its folder."""
    with open(path, "wb") as f:
        f.write(data)
        if ENABLED:
            f.flush()
            os.fsync(f.fileno())
    if ENABLED:
        fsync_folder(os.path.dirname(os.fspath(path)) or ".")


def _array_folder(array: Any) -> Optional[Path]:
    """The folder of zarr `array`; None when it is not in a local folder (an object store, memory)."""
    from zarr.storage import LocalStore

    store = getattr(array, "store", None)
    if not isinstance(store, LocalStore):
        return None
    return Path(store.root) / array.path if array.path else Path(store.root)


def chunk_files(array: Any, region: tuple[slice, ...]) -> Optional[list[Path]]:
    """The files of the chunks of zarr `array` that `region` touches; None when the array is not
    in a local folder (an object store, memory), where there is nothing to sync."""
    root = _array_folder(array)
    if root is None:
        return None
    ranges = []
    for s, n, c in zip(region, array.shape, array.chunks):
        start, stop, _ = s.indices(n)
        ranges.append(range(start // c, -(-stop // c)))
    return [root / array.metadata.encode_chunk_key(coords) for coords in itertools.product(*ranges)]


def sync_region(array: Any, region: tuple[slice, ...], known: Optional[set] = None) -> None:
    """fsync the chunk files of `region` of a local zarr `array` (written), then, once each, the
    folders between them and the array's folder (zarr creates chunk folders as it goes).

    `known` (kept by the caller across blocks) holds folders whose own entry in
    their parent was synced already: their parents are not synced again, so a
    block costs a sync per chunk file and one per folder holding them, and the
    folders above only when a new one appeared below them.
    """
    if not ENABLED:
        return
    files = chunk_files(array, region)
    if not files:
        return
    root = _array_folder(array)
    known = set() if known is None else known
    folders: dict[Path, None] = {}
    for path in files:
        for folder in path.parents:
            folders[folder] = None  # it holds a new entry: the chunk, or a folder not known yet
            if folder == root or folder in known:
                break
    # deepest first: a folder's entry in its parent is synced after the folder's own entries
    order = sorted(folders, key=lambda f: len(f.parts), reverse=True)
    sync_files(files, order)
    known.update(order)  # only once synced: another thread must not skip a sync still to come


def sync_tree(root: PathLike, skip: Iterable[str] = ()) -> None:
    """fsync every file and folder under `root` (itself included); of the top-level folders
    named in `skip` (arrays whose chunks were synced block by block) only the files directly
    in them (their metadata) and the folders themselves."""
    if not ENABLED:
        return
    root = os.fspath(root)
    skipped = {os.path.join(root, name) for name in skip}
    files, folders = [], []
    for folder, subfolders, names in os.walk(root):
        if folder in skipped:
            subfolders[:] = []
        folders.append(folder)
        files.extend(os.path.join(folder, name) for name in names)
    sync_files(files, folders)


def sync_metadata(folder: PathLike) -> None:
    """fsync the files directly in `folder` (a zarr group's or array's metadata) and the folder."""
    if not ENABLED:
        return
    with os.scandir(folder) as entries:
        files = [entry.path for entry in entries if entry.is_file()]
    sync_files(files, [folder])
