"""One writer per output: a lock file beside it, taken before anything is written.

A run that writes an output (``segment`` in every mode, ``--resume`` and
``--overwrite`` included, and the ``objects`` pass) first creates
``.<name>.lock`` in the folder that holds the output (``out.zarr`` ->
``.out.zarr.lock``), atomically: a local file is written whole under a
temporary name and hard-linked into place, which fails if a lock is there
(the one test-and-set that local and NFS file systems both have); on S3 it is
a PUT with ``If-None-Match: *``. The lock sits beside the output, not in it,
because an overwrite writes a temporary sibling and swaps it in, and a URL
output is cleared when an overwrite starts: the lock guards the final name
through all of that. It holds JSON naming the run (host, pid, start time, run
id, command), and is removed when the run ends: success, error or Ctrl-C.

A second run finds the lock and is refused at once with one line that names
the first. A lock whose run is dead is taken over, with a `StaleLockWarning`:

- same host: its pid no longer exists (or is another process now: the
  process start time differs);
- object stores: its lease expired. The holder renews it every `RENEW_S`
  seconds (a daemon thread) to `LEASE_S` ahead, so a run that was killed
  frees its output two minutes later; the take-over is a PUT conditional on
  the stale lock's ETag, so of two runs taking it over one wins;
- another host, local (shared) file system: the holder touches the file
  every `RENEW_S` seconds; it is dead when the file was not touched for
  `SHARED_LEASE_S` (15 minutes: generous, because a pid on another host
  cannot be asked and clocks of file servers and clients drift).

Locally, a take-over holds ``flock`` on the stale file while it checks it is
still the same stale lock and renames its own over it, so two runs taking
over the same dead run's lock cannot both win. Distributed runs hold the
lock on the client; the workers never take it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import OutputBusyError, StaleLockWarning

__all__ = ["OutputLock", "Holder", "StaleLockWarning", "LEASE_S", "RENEW_S", "SHARED_LEASE_S", "lock_location"]

#: Seconds an object-store lock stays valid after its last renewal.
LEASE_S = 120.0
#: Seconds between renewals (object stores: the lease; local files: their modification time).
RENEW_S = 30.0
#: Seconds after its last renewal that a local lock of another host counts as dead.
SHARED_LEASE_S = 15 * 60.0


@dataclass(frozen=True)
class Holder:
    """The run a lock names."""

    host: str
    pid: int
    started: float  # seconds since the epoch
    run_id: str
    command: str = "segment"
    expires: Optional[float] = None  # object stores: end of the lease
    pid_started: Optional[int] = None  # Linux: the process's start time, in clock ticks after boot

    @classmethod
    def this_process(cls, command: str, expires: Optional[float] = None) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), time.time(), uuid.uuid4().hex, command, expires,
                   _process_start(os.getpid()))

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Optional["Holder"]:
        """The holder in `data`; None when it is not a lock (empty or cut short)."""
        try:
            fields = json.loads(data)
            return cls(str(fields["host"]), int(fields["pid"]), float(fields["started"]), str(fields["run_id"]),
                       str(fields.get("command", "segment")), fields.get("expires"), fields.get("pid_started"))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        """``pid 1234 on host foo since 2026-12-01 09:10:03 (tilesegment segment)``."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host} since {since} (tilesegment {self.command})"

    def dead_because(self, renewed: Optional[float], now: float) -> Optional[str]:
        """Why the run this lock names is dead (None: it may be alive).

        `renewed` is when a local lock was last touched (None on object stores,
        whose locks carry their lease in `expires`).
        """
        if self.host == socket.gethostname():
            if not _pid_alive(self.pid):
                return f"its process {self.pid} no longer exists"
            start = _process_start(self.pid)
            if self.pid_started is not None and start is not None and start != self.pid_started:
                return f"its process {self.pid} ended (the pid is another process's now)"
            return None
        if self.expires is not None:
            return f"its lease expired {now - self.expires:.0f} s ago" if now > self.expires else None
        if renewed is not None and now - renewed > SHARED_LEASE_S:
            return f"it was not renewed for {(now - renewed) / 60:.0f} minutes"
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OSError:
        return True
    return True


def _process_start(pid: int) -> Optional[int]:
    """The start time of process `pid` in clock ticks after boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after its last ")"
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def lock_location(target: Any, storage_options: Optional[dict] = None) -> Optional[tuple[Any, str, bool]]:
    """``(filesystem, lock path, local)`` for an output path or URL; None for other targets (stores).

    The lock of ``dir/out.zarr`` is ``dir/.out.zarr.lock``, beside the output.
    """
    from .remote import filesystem, is_url
    from .sinks import is_local_path

    if is_url(target):
        fs, root = filesystem(target, storage_options)
        root = root.rstrip("/")
        parent, _, name = root.rpartition("/")
        if not parent:  # a bucket itself: the lock goes inside it
            return fs, f"{root}/.tilesegment.lock", False
        return fs, f"{parent}/.{name}.lock", False
    if is_local_path(target):
        path = Path(os.path.abspath(os.fspath(target)))
        return None, os.fspath(path.with_name(f".{path.name}.lock")), True
    return None


class OutputLock:
    """The right to write one output, for one run.

    Parameters
    ----------
    target : path or URL
        The output (the final name, also when an overwrite writes beside it).
    storage_options : dict, optional
        fsspec options of a URL target.
    command : str
        What the run is (``"segment"``, ``"objects"``), for the message others get.

    Examples
    --------
    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "out.zarr")
    >>> with OutputLock(out):
    ...     OutputLock(out).acquire()
    Traceback (most recent call last):
    ...
    tilesegment.errors.OutputBusyError: '...out.zarr' is being written by pid ... wait for it, or stop it first
    """

    def __init__(self, target: Any, storage_options: Optional[dict] = None, command: str = "segment") -> None:
        location = lock_location(target, storage_options)
        if location is None:
            raise ValueError(f"{target!r} is not a path or URL; stores are not locked")
        self.target = target
        self._fs, self.path, self._local = location
        self._command = command
        self._mine: Optional[Holder] = None
        self._stop = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    # -- reading ------------------------------------------------------------------------

    def _read(self) -> Optional[tuple[Holder, Optional[float]]]:
        """The lock's holder and (local files) when it was last renewed; None when there is none."""
        try:
            if self._local:
                with open(self.path, "rb") as f:
                    data, renewed = f.read(), os.fstat(f.fileno()).st_mtime
            else:
                self._fs.invalidate_cache(self.path)
                data, renewed = self._fs.cat_file(self.path), None
        except FileNotFoundError:
            return None
        holder = Holder.from_bytes(data)
        if holder is None:  # cut short by a crash while it was written (never, locally: linked whole)
            holder = Holder("?", -1, renewed or 0.0, "?", "?", expires=0.0)
        return holder, renewed

    def holder(self) -> Optional[Holder]:
        """The live run that holds the lock (None: no lock, a dead run's, or this object's own)."""
        found = self._read()
        if found is None:
            return None
        holder, renewed = found
        if self._mine is not None and holder.run_id == self._mine.run_id:
            return None
        return None if holder.dead_because(renewed, time.time()) else holder

    def _busy(self, holder: Holder) -> OutputBusyError:
        return OutputBusyError(f"{str(self.target)!r} is being written by {holder.describe()}; wait for it, "
                               "or stop it first")

    def check(self) -> None:
        """Raise `OutputBusyError` if another live run holds the lock (takes nothing)."""
        holder = self.holder()
        if holder is not None:
            raise self._busy(holder)

    # -- taking and giving back -----------------------------------------------------------------

    def acquire(self) -> "OutputLock":
        """Take the lock, or a dead run's over (with a `StaleLockWarning`); return self.

        Raises
        ------
        OutputBusyError
            If a live run holds it; the message names that run.
        """
        if self._mine is not None:
            raise RuntimeError("this OutputLock is already held")
        deadline = time.monotonic() + 5.0
        while True:
            mine = Holder.this_process(self._command, None if self._local else time.time() + LEASE_S)
            if self._create(mine):
                break
            found = self._read()
            if found is None:
                continue  # released between the two calls: try again
            holder, renewed = found
            reason = holder.dead_because(renewed, time.time())
            if reason is None:
                raise self._busy(holder)
            if self._take_over(holder, mine):
                warnings.warn(f"{str(self.target)!r} was locked by {holder.describe()}, but {reason}; "
                              "this run takes the lock over", StaleLockWarning, stacklevel=3)
                break
            if time.monotonic() > deadline:  # another run keeps taking it over: it is theirs
                raise self._busy(holder)
            time.sleep(0.05)
        self._mine = mine
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name="tilesegment-lock", daemon=True)
        self._renewer.start()
        return self

    def _create(self, mine: Holder) -> bool:
        """Create the lock file with `mine` in it; False if one exists."""
        if not self._local:
            try:
                self._fs.pipe_file(self.path, mine.to_bytes(), mode="create")  # S3: If-None-Match: *
            except FileExistsError:
                return False
            return True
        from . import durable

        staging = f"{self.path}.{mine.run_id}"
        durable.write_synced(staging, mine.to_bytes())
        try:
            os.link(staging, self.path)  # whole, or not at all: never a half-written lock
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links (FAT, some SMB shares)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(mine.to_bytes())
        finally:
            os.unlink(staging)
        durable.sync_files([], [os.path.dirname(self.path)])
        return True

    def _take_over(self, stale: Holder, mine: Holder) -> bool:
        """Replace the lock of dead run `stale` with `mine`; False if it changed meanwhile."""
        if not self._local:
            return self._take_over_remote(stale, mine)
        import fcntl

        from . import durable

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            try:  # one take-over at a time: the others wait, then find this run's lock
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    return False  # replaced since we opened it
            except FileNotFoundError:
                return False
            current = Holder.from_bytes(os.pread(fd, 1 << 16, 0))
            if current is not None and current.run_id != stale.run_id:
                return False
            staging = f"{self.path}.{mine.run_id}"
            durable.write_synced(staging, mine.to_bytes())
            os.replace(staging, self.path)
            durable.sync_files([], [os.path.dirname(self.path)])
            return True
        finally:
            os.close(fd)

    def _take_over_remote(self, stale: Holder, mine: Holder) -> bool:
        try:
            info = self._fs.info(self.path)
        except FileNotFoundError:
            return False
        current = Holder.from_bytes(self._fs.cat_file(self.path))
        if current is not None and current.run_id != stale.run_id:
            return False
        etag = info.get("ETag")
        try:
            if etag and "s3" in _protocols(self._fs):
                self._fs.pipe_file(self.path, mine.to_bytes(), IfMatch=etag)  # only over that very lock
            else:  # no conditional PUT: best effort
                self._fs.rm(self.path)
                self._fs.pipe_file(self.path, mine.to_bytes(), mode="create")
        except (FileExistsError, FileNotFoundError):
            return False
        except OSError as exc:  # 412 Precondition Failed: another run took it over first
            if "recondition" in str(exc) or getattr(exc, "errno", None) == 22:
                return False
            raise
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self.renew()
            except Exception:  # a network hiccup: the next renewal tries again, well inside the lease
                pass

    def renew(self) -> None:
        """Push the lease forward (object stores) or touch the file (local); a no-op once lost."""
        mine = self._mine
        if mine is None:
            return
        found = self._read()
        if found is None or found[0].run_id != mine.run_id:
            return  # taken over after this run stalled past its lease: it is the other run's now
        if self._local:
            os.utime(self.path)
        else:
            self._mine = Holder(**{**asdict(mine), "expires": time.time() + LEASE_S})
            self._fs.pipe_file(self.path, self._mine.to_bytes())

    def release(self) -> None:
        """Remove the lock if this run still holds it (idempotent)."""
        mine, self._mine = self._mine, None
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if mine is None:
            return
        found = self._read()
        if found is None or found[0].run_id != mine.run_id:
            return
        if self._local:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        else:
            self._fs.rm(self.path)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._mine is not None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
