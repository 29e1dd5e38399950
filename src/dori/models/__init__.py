"""The model interface and its backends (the bundled model, Stable Diffusion from a local folder)."""

from dori.models.base import DiffusionModel, Site
from dori.models.loading import load_model

__all__ = ["DiffusionModel", "Site", "load_model"]
