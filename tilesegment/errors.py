"""One exception family; every message names the value seen and what to do."""

from __future__ import annotations

__all__ = [
    "TileSegmentError",
    "UsageError",
    "InvalidTileSize",
    "InputError",
    "ModelError",
    "OutputExistsError",
    "OutputBusyError",
    "TileReadError",
    "ModelOutputError",
    "Cancelled",
    "StaleLockWarning",
]


class TileSegmentError(Exception):
    """Base class of every error tilesegment raises on purpose."""

    #: Exit status of the CLI: 2 for a usage error, 1 for a runtime error.
    exit_code = 1


class UsageError(TileSegmentError, ValueError):
    """A parameter has a value that cannot work."""

    exit_code = 2


class InvalidTileSize(UsageError):
    """A tile or input size does not fit the network's geometry."""


class InputError(TileSegmentError, ValueError):
    """The input image is missing, unreadable or has an unsupported layout."""

    exit_code = 2


class ModelError(TileSegmentError, ValueError):
    """The model cannot be loaded or does not fit the image."""

    exit_code = 2


class OutputExistsError(TileSegmentError, FileExistsError):
    """The output exists and overwriting was not requested."""

    exit_code = 2


class OutputBusyError(TileSegmentError):
    """Another live run is writing the output (`tilesegment.io.lock`); the message names it."""

    exit_code = 2


class TileReadError(TileSegmentError):
    """A region of the image could not be read or decoded during the run."""


class ModelOutputError(TileSegmentError):
    """The model produced NaN or Inf."""


class Cancelled(TileSegmentError):
    """The caller cancelled the run (a `Reporter` said so); what was finished is kept."""

    exit_code = 130


class StaleLockWarning(UserWarning):
    """A lock left on an output by a run that is no longer alive was taken over (`tilesegment.io.lock`)."""


def cause(exc: BaseException, limit: int = 300) -> str:
    """A library exception as a short clause for our messages: ``"TypeName: first line"``.

    Format libraries (tifffile, zarr, PyYAML, pydantic) write messages over
    several lines; ours stay on one, so only the first non-empty line is kept,
    cut at `limit` characters.

    Examples
    --------
    >>> cause(ValueError("bad tag\\n  details"))
    'ValueError: bad tag'
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
