"""The demo model pair that ships inside the package, and resolution of model references.

The table of demo names, bases and descriptions is in :mod:`cgidm_core.names` (torch-free, read
by the gateway's registry too); this module finds their folders.

Why ship models: the method needs a pretrained model *and* a fine-tune with known members. Real
Stable Diffusion pairs are gigabytes and need a GPU; this pair is a few megabytes, runs on a CPU,
and was fine-tuned on the ten Van Gogh "membership" paintings of the authors' demo data, so
``cgidm`` can show a real, reproducible result right after ``pip install``. Both models are
retrained by ``scripts/train_demo_pair.py``.

Why a second, light fine-tune: ``demo-vangogh`` memorised its members so thoroughly that every
membership method scores them perfectly, which shows the tool works but cannot compare methods.
``demo-vangogh-light`` is the same recipe stopped early, closer to what a rights holder meets.

Why a latent family (``demo-latent-base`` and its LoRA): the models people share are LoRAs and
DreamBooth fine-tunes of latent, text-conditioned pipelines; a Stable Diffusion folder small
enough for a CPU takes ``cgidm check`` through the real SD code (prompt encoding, VAE, latent
mask, LoRA loading). Trained by ``scripts/train_latent_demo.py``.

Why a flow-matching pair: Flux.1 and SD3 are trained by flow matching, where CGI-DM contrasts
velocity predictions instead of noise predictions. ``demo-flow-base``/``demo-flow-vangogh`` are
the same UNet, data and fine-tune as the DDPM pair, trained by flow matching, so the flow form of
the method runs on real paintings on a CPU.
"""

from __future__ import annotations

from pathlib import Path

from cgidm_core.errors import ModelNotFoundError
from cgidm_core.names import DEMO_BASES, DEMO_FAMILIES, DEMO_MODELS

#: Folder holding the packaged models (package data).
DEMO_MODELS_DIR = Path(__file__).resolve().parent / "demo_models"



def demo_model_path(name: str) -> Path:
    """Folder of a packaged demo model: a pipeline folder (``DDPMPipeline`` for the pixel
    models, ``StableDiffusionPipeline`` for demo-latent-base) or, for a LoRA, the folder of its
    ``pytorch_lora_weights.safetensors`` as diffusers' trainers leave it."""
    if name not in DEMO_MODELS:
        raise ModelNotFoundError(
            f"unknown demo model {name!r}; the demo models are: {', '.join(DEMO_MODELS)}"
        )
    path = DEMO_MODELS_DIR / name
    if not ((path / "model_index.json").is_file()
            or (path / "pytorch_lora_weights.safetensors").is_file()):
        raise ModelNotFoundError(
            f"demo model {name!r} is missing from the installation ({path}); reinstall cgidm or "
            "retrain it with scripts/train_demo_pair.py"
        )
    return path


def resolve_model_reference(ref: str | Path) -> Path:
    """Turn what a user typed where a model is expected into a folder or file path.

    A demo name wins over a same-named relative path, so ``demo-base`` always means the packaged
    model. Anything else must exist on disk.
    """
    if isinstance(ref, str) and ref in DEMO_MODELS:
        return demo_model_path(ref)
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {str(ref)!r} not found: it is neither an existing path nor a demo model "
            f"({', '.join(DEMO_MODELS)})"
        )
    return path


def list_demo_models() -> list[dict[str, str | None]]:
    """One record per demo model: name, path, family, what it was fine-tuned from, description."""
    return [
        {
            "name": name,
            "path": str(DEMO_MODELS_DIR / name),
            "family": DEMO_FAMILIES[name],
            "finetuned_from": DEMO_BASES[name],
            "description": description,
        }
        for name, description in DEMO_MODELS.items()
    ]
