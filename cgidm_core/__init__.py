"""CGI-DM, contrasting gradient inversion, as a plain library (no web, queue or storage code)."""

from .api import authenticate, load_pair
from .errors import CGIDMError
from .inversion import InversionConfig, invert
from .pair import Conditioning, ModelPair
from .results import ImageResult

__all__ = [
    "CGIDMError",
    "Conditioning",
    "ImageResult",
    "InversionConfig",
    "ModelPair",
    "authenticate",
    "invert",
    "load_pair",
]
