"""dori: find, attack and remove memorized training images in text-to-image diffusion models.

The package implements "Finding DoRI: Discovery of Retained Images in Diffusion Models"
(Kowalczuk et al., arXiv 2507.16880) as a library and a command-line tool.
"""

from dori.errors import DoriError
from dori.models import DiffusionModel, Site, load_model

__all__ = ["DiffusionModel", "DoriError", "Site", "load_model"]
__version__ = "0.1.0"
