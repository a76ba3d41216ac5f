"""Built-in networks, model loading, and the facts the engine reads off any model (`describe`)."""

from .base import ModelBase, ProbedModel, describe
from .load import load_model, save_model
from .planes import PlaneWise
from .unet import UNet

__all__ = ["ModelBase", "PlaneWise", "ProbedModel", "UNet", "describe", "load_model", "save_model"]
