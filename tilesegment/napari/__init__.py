"""napari plugin (npe2, manifest ``napari.yaml``): open tilesegment results and segment from the viewer.

Install with ``pip install "tilesegment[napari]"`` and a Qt binding of your
choice (``pip install pyqt5``; napari's guide asks plugins not to pick one).
See docs/napari.md. The reader, the run logic and the sample data import
no Qt; the widgets need a running napari.
"""

from ._reader import get_reader, get_slide_reader, image_layer, read_output, read_slide
from ._run import Progress, Request, context_box, run_request
from ._sample import blobs_volume, he_slide

__all__ = ["get_reader", "get_slide_reader", "image_layer", "read_output", "read_slide", "Progress", "Request",
           "context_box", "run_request", "blobs_volume", "he_slide"]
