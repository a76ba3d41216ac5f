"""Built-in networks and model loading."""

from .load import load_model, save_model
from .planes import PlaneWise
from .unet import UNet

__all__ = ["PlaneWise", "UNet", "load_model", "save_model"]
