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
    pixels: int
    skipped: int = 0

    @property
    def megapixels_per_second(self) -> float:
        """Written output pixels per second, in millions."""
        return self.pixels / max(self.seconds, 1e-9) / 1e6


def progress_bar(total: int, enabled: bool):
    """A tqdm bar counting tiles; silent when not `enabled`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tile", disable=not enabled, leave=False, dynamic_ncols=True)
