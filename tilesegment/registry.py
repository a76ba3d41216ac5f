"""Named extension points: readers, model loaders, modes and chunk steps, built in or installed.

Each `Registry` holds the implementations of one contract
(`tilesegment.contracts`) under a name. Ours register themselves when their
module is imported; another package adds its own without editing this one,
through an entry point in its ``pyproject.toml``::

    [project.entry-points."tilesegment.readers"]
    mrxs = "my_package.mrxs:MrxsReader"

Entry points load on the first lookup. One that fails to import is skipped
with a warning that names it, so a broken plug-in never breaks a run that
does not need it. Lookups that try every entry (`open_image`, `load_model`)
go in ``priority`` order, lowest first, then in the order of registration
(ours first, then entry points by name): a specific reader (priority 10) is
asked before a catch-all (100).
"""

from __future__ import annotations

import importlib
import threading
import warnings
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

__all__ = ["Registry", "readers", "model_loaders", "modes", "steps"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Implementations of one contract, by name.

    Parameters
    ----------
    kind : str
        What the entries are, for messages ("reader", "model loader").
    group : str
        The entry point group third-party packages register under.
    builtins : str
        Module that registers our own entries when imported (lazily: a
        registry costs nothing until it is used).
    """

    def __init__(self, kind: str, group: str, builtins: Optional[str] = None) -> None:
        self.kind, self.group, self._builtins = kind, group, builtins
        self._entries: dict[str, T] = {}
        self._loaded = False
        self._lock = threading.RLock()

    def register(self, name: str, entry: Optional[T] = None) -> Any:
        """Add `entry` under `name`; without `entry`, a class or function decorator.

        A name registered again replaces the earlier entry (a plug-in may
        override one of ours, on purpose).
        """
        if entry is None:
            def decorate(obj: Any) -> Any:
                self.register(name, obj)
                return obj
            return decorate
        with self._lock:
            self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove `name` (tests that register a temporary entry)."""
        with self._lock:
            self._entries.pop(name, None)

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            self._loaded = True  # before importing: a builtins module may look entries up
            if self._builtins:
                importlib.import_module(self._builtins)
            for point in sorted(entry_points(group=self.group), key=lambda p: p.name):
                if point.name in self._entries:
                    continue  # registered by hand already (or a second distribution of one name)
                try:
                    loaded = point.load()
                except Exception as exc:  # a plug-in must not break runs that do not use it
                    warnings.warn(f"tilesegment {self.kind} {point.name!r} ({point.value}) failed to "
                                  f"load and is skipped: {type(exc).__name__}: {exc}", stacklevel=3)
                    continue
                self._entries[point.name] = loaded() if isinstance(loaded, type) else loaded

    def get(self, name: str) -> T:
        """The entry called `name`; KeyError names the ones there are."""
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """Every registered name, in lookup order."""
        return [name for name, _ in self.items()]

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs by ``priority`` (lowest first, 50 when unset), then registration."""
        self._load()
        with self._lock:
            pairs = list(self._entries.items())
        return sorted(pairs, key=lambda kv: getattr(kv[1], "priority", 50))

    def __iter__(self) -> Iterator[T]:
        return iter([entry for _, entry in self.items()])

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def first(self, accepts: Callable[[T], bool]) -> Optional[T]:
        """The first entry, in lookup order, for which `accepts` is true; None if none."""
        return next((entry for entry in self if accepts(entry)), None)


#: Image formats (`tilesegment.contracts.Reader`): `open_image` asks each `can_open`.
readers: Registry = Registry("reader", "tilesegment.readers", "tilesegment.io.formats")
#: Model backends (`tilesegment.contracts.ModelLoader`): `load_model` asks each `can_load`.
model_loaders: Registry = Registry("model loader", "tilesegment.models", "tilesegment.models.loaders")
#: Output modes (`tilesegment.contracts.Mode`) by name: ``mode="labels"``.
modes: Registry = Registry("mode", "tilesegment.modes", "tilesegment.modes")
#: Post-processing steps over label maps (`tilesegment.contracts.ChunkStep`) by name.
steps: Registry = Registry("chunk step", "tilesegment.steps", None)
