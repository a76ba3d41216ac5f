"""What a run reports: its statistics and its progress bar (shared by local and cluster runs)."""

from __future__ import annotations

from dataclasses import dataclass

from .geometry import Pair

__all__ = ["RunStats", "progress_bar"]


@dataclass(frozen=True)
class RunStats:
    """What a `segment` run did: sizes and timing."""

    tiles: int
    tile_size: Pair
    input_size: Pair
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


def progress_bar(total: int, enabled: bool):
    """A tqdm bar counting tiles; silent when not `enabled`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tile", disable=not enabled, leave=False, dynamic_ncols=True)
