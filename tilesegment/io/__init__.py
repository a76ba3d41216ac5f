"""Image sources, mirror-padded gathering and output sinks."""

from .sources import Backend, ImageSource, open_image

__all__ = ["Backend", "ImageSource", "open_image"]
