"""What a run reports: its statistics, and its progress to a `Reporter`, which may cancel it.

A `Reporter` is what a front-end gives a long run: a progress bar in a
terminal (tqdm), a callback, a GUI's progress bar with a cancel button. The
run calls ``start(total)`` once, ``advance(n)`` as tiles (or chunks) are
done, and asks ``cancelled()`` between batches; when it says yes, the run
stops within one batch, keeps every block it finished (the same record a
killed run leaves, so ``resume=True`` continues it) and raises `Cancelled`.
Local and cluster runs report the same way.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Union

from .contracts import Reporter
from .geometry import Shape

__all__ = ["RunStats", "Reporter", "TqdmReporter", "CallbackReporter", "as_reporter"]


@dataclass(frozen=True)
class RunStats:
    """What a `segment` run did: sizes and timing."""

    tiles: int
    tile_size: Shape
    input_size: Shape
    batch_size: int
    device: str
    seconds: float
    pixels: int  # written by this run: a resumed run does not count what an earlier one wrote
    skipped: int = 0  # tiles without tissue, written as background
    resumed: int = 0  # tiles an earlier, stopped run had written

    @property
    def computed(self) -> int:
        """Tiles this run ran the network on."""
        return self.tiles - self.skipped - self.resumed

    @property
    def megapixels_per_second(self) -> float:
        """Output pixels written by this run per second, in millions."""
        return self.pixels / max(self.seconds, 1e-9) / 1e6


Cancel = Union[None, threading.Event, Callable[[], bool]]


def progress_of(reporter: Reporter) -> str:
    """``"after 20 of 100"``, for reporters that count (ours do), else ``""``: for messages."""
    done, total = getattr(reporter, "done", None), getattr(reporter, "total", None)
    return "" if done is None or total is None else f"after {done} of {total}"


class _Reporter:
    """Counting and the cancel token, shared by the reporters below."""

    def __init__(self, cancel: Cancel = None) -> None:
        self.done = self.total = 0
        self._cancel = cancel

    def start(self, total: int, what: str) -> None:
        self.done, self.total = 0, int(total)

    def advance(self, n: int) -> None:
        self.done += int(n)

    def cancelled(self) -> bool:
        cancel = self._cancel
        if cancel is None:
            return False
        return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())

    def close(self) -> None:
        pass


class TqdmReporter(_Reporter):
    """A tqdm progress bar in the terminal (silent when not `enabled`).

    Parameters
    ----------
    enabled : bool
        Show the bar.
    cancel : threading.Event or callable, optional
        Set (or returning True) to cancel the run.
    unit : str
        What is counted.
    """

    def __init__(self, enabled: bool = True, cancel: Cancel = None, unit: str = "tile") -> None:
        super().__init__(cancel)
        self.enabled, self.unit, self._bar = enabled, unit, None

    def start(self, total: int, what: str) -> None:
        from tqdm.auto import tqdm

        super().start(total, what)
        self.close()
        self._bar = tqdm(total=total, unit=self.unit, desc=what or None, disable=not self.enabled,
                         leave=False, dynamic_ncols=True)

    def advance(self, n: int) -> None:
        super().advance(n)
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class CallbackReporter(_Reporter):
    """Calls ``callback(done, total)`` as work is done; a callback that returns False cancels.

    Examples
    --------
    >>> seen = []
    >>> reporter = CallbackReporter(lambda done, total: seen.append((done, total)))
    >>> reporter.start(3, "tiles"); reporter.advance(2); reporter.advance(1)
    >>> seen, reporter.cancelled()
    ([(0, 3), (2, 3), (3, 3)], False)
    """

    def __init__(self, callback: Callable[[int, int], Any], cancel: Cancel = None) -> None:
        super().__init__(cancel)
        self._callback, self._stop = callback, False

    def _tell(self) -> None:
        self._stop = self._callback(self.done, self.total) is False or self._stop

    def start(self, total: int, what: str) -> None:
        super().start(total, what)
        self._tell()

    def advance(self, n: int) -> None:
        super().advance(n)
        self._tell()

    def cancelled(self) -> bool:
        return self._stop or super().cancelled()


def as_reporter(progress: Union[bool, Callable[[int, int], Any], Reporter], cancel: Cancel = None,
                unit: str = "tile") -> Reporter:
    """The `Reporter` that a ``progress=`` argument asks for.

    Parameters
    ----------
    progress : bool, callable or Reporter
        True/False: a tqdm bar, shown or not; a callable: called with
        ``(done, total)``, and returning False cancels; a `Reporter`: used as is.
    cancel : threading.Event or callable, optional
        A cancel token: set (or returning True) to stop the run.
    unit : str
        What the bar counts.
    """
    if isinstance(progress, Reporter) and not isinstance(progress, type):
        if cancel is not None:
            raise TypeError("pass the cancel token to your Reporter; cancel= goes with progress=True/False "
                            "or a callback")
        return progress
    if callable(progress):
        return CallbackReporter(progress, cancel)
    return TqdmReporter(bool(progress), cancel, unit)
