"""Model families behind the :class:`~cgidm_core.pair.ModelPair` interface, and their loading."""

from cgidm_core.models.ddpm import DDPMPair
from cgidm_core.models.formats import detect_finetuned_kind
from cgidm_core.models.loading import load_pair_from_paths
from cgidm_core.models.stable_diffusion import StableDiffusionLoraPair, StableDiffusionPair
from cgidm_core.names import FINETUNED_KINDS

__all__ = [
    "FINETUNED_KINDS",
    "DDPMPair",
    "StableDiffusionLoraPair",
    "StableDiffusionPair",
    "detect_finetuned_kind",
    "load_pair_from_paths",
]
