"""Built-in networks and model loading."""

from .load import load_model, save_model
from .unet import UNet

__all__ = ["UNet", "load_model", "save_model"]
