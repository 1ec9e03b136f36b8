"""CGI-DM, contrasting gradient inversion, as a plain library (no web, queue or storage code).

``import cgidm_core`` is cheap and does not import torch: the names below load their module on
first use (PEP 562), so the gateway and the CLI can import the torch-free
:mod:`cgidm_core.names`, :mod:`cgidm_core.errors` and :mod:`cgidm_core.inversion_config`
(``InversionConfig``) from a machine without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "CGIDMError": "errors",
    "Conditioning": "pair",
    "ImageResult": "results",
    "InversionConfig": "inversion_config",
    "ModelPair": "pair",
    "authenticate": "api",
    "invert": "inversion",
    "load_pair": "api",
}

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

if TYPE_CHECKING:
    from .api import authenticate, load_pair
    from .errors import CGIDMError
    from .inversion import invert
    from .inversion_config import InversionConfig
    from .pair import Conditioning, ModelPair
    from .results import ImageResult


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
