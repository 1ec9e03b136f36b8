"""Specific exceptions of the method library.

Every error carries a message that tells the user what to do next, because these messages reach
people through the CLI (one line, no traceback) and through the service (a JSON error body).
Each class has a stable machine-readable ``code`` that the service puts in ``error.code``.
"""

from __future__ import annotations


class CGIDMError(Exception):
    """Base of every error cgidm_core raises on purpose."""

    code = "cgidm_error"


class ModelNotFoundError(CGIDMError):
    """A model path or demo name does not exist."""

    code = "model_not_found"


class ModelFormatError(CGIDMError):
    """A model exists but is not in a format cgidm can load (or is corrupt)."""

    code = "model_format"


class UnsupportedModelFamilyError(ModelFormatError):
    """The model belongs to a family cgidm does not support (Stable Diffusion 3, the SDXL
    refiner, an unknown pipeline class); SDXL base and Flux.1 are supported."""

    code = "unsupported_family"


class IncompatiblePairError(CGIDMError):
    """Pretrained and fine-tuned models cannot be compared (different latent sizes, families...)."""

    code = "incompatible_pair"


class FamilyMismatchError(IncompatiblePairError):
    """The fine-tune's own header says it was trained for another family's base than the one
    given, though its tensor names fit this base too (a Flux.2 Klein LoRA on a Chroma base):
    loading it would compute the verdict on the wrong model. ``trained_for`` names the
    families the header names."""

    code = "family_mismatch"

    def __init__(self, message: str, trained_for: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.trained_for = trained_for


class ImageInputError(CGIDMError):
    """An input image cannot be read or used."""

    code = "bad_image"


class ConfigError(CGIDMError):
    """A method setting is out of its valid range."""

    code = "bad_setting"


class Cancelled(CGIDMError):
    """The caller's cancel hook asked the inversion to stop."""

    code = "cancelled"


class OutOfMemory(CGIDMError):
    """The device ran out of memory even at batch size 1."""

    code = "out_of_memory"
