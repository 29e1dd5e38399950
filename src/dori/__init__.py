"""dori: find, attack and remove memorized training images in text-to-image diffusion models.

The package implements "Finding DoRI: Discovery of Retained Images in Diffusion Models"
(Kowalczuk et al., arXiv 2507.16880) as a library and a command-line tool.

``import dori`` is light: torch and the model libraries load on first use of a name that needs
them (``dori.load_model``, ``dori.DiffusionModel``), so the CLI answers ``--help`` at once.
"""

from dori.errors import DoriError

__all__ = ["DiffusionModel", "DoriError", "Site", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("DiffusionModel", "Site", "load_model"):
        import dori.models

        return getattr(dori.models, name)
    raise AttributeError(f"module 'dori' has no attribute {name!r}")
