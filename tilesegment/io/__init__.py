"""Image sources, mirror-padded gathering and output sinks."""

from .sources import ImageSource, open_image

__all__ = ["ImageSource", "open_image"]
