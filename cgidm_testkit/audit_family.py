"""Fine-tunes of ``demo-base`` for audits: a family of suspects, some trained on the portfolio,
the rest on other images, cached by recipe so a benchmark or a test makes each one once.

Why here (tests and benchmarks share it): the audit test needs one non-member model of the demo
base (a model equal to its base is refused at loading: there is nothing to contrast), and
``benchmarks/audit.py`` needs tens of them; both must make them the same way, with the project's
own training loop (:mod:`cgidm_core.training`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

#: Where made fine-tunes are kept between runs (shared with other sessions: ~/.cache/cgidm).
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "cgidm" / \
    "audit-family"


@dataclass(frozen=True)
class FinetuneRecipe:
    """One full fine-tune of demo-base on the images of one folder (all of them)."""

    images: str  # folder
    steps: int
    seed: int = 0
    learning_rate: float = 2e-4
    batch_size: int = 8

    def key(self) -> str:
        files = sorted(p.name for p in Path(self.images).iterdir())
        digest = hashlib.sha256(json.dumps([asdict(self), files], sort_keys=True).encode())
        return f"{Path(self.images).name}-s{self.steps}-r{self.seed}-{digest.hexdigest()[:10]}"


def make_finetune(recipe: FinetuneRecipe, cache: Path | None = None) -> Path:
    """The pipeline folder of ``recipe``'s fine-tune, trained now unless already cached."""
    from cgidm_core.demo import demo_model_path
    from cgidm_core.training import (
        DEMO_IMAGE_SIZE,
        FixedImages,
        TrainConfig,
        load_images_as_tensor,
        load_pipeline_parts,
        save_pipeline,
        train,
    )

    out = (cache or DEFAULT_CACHE) / recipe.key()
    if (out / "model_index.json").is_file():
        return out
    unet, scheduler = load_pipeline_parts(demo_model_path("demo-base"))
    _, images = load_images_as_tensor(recipe.images, DEMO_IMAGE_SIZE)
    config = TrainConfig(steps=recipe.steps, batch_size=recipe.batch_size,
                         learning_rate=recipe.learning_rate, seed=recipe.seed,
                         warmup_steps=min(20, recipe.steps // 10),
                         lr_schedule="constant_with_warmup")
    train(unet, scheduler, FixedImages(images, seed=recipe.seed), config, progress=False)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    save_pipeline(unet, scheduler, tmp)
    tmp.rename(out)
    return out


def make_perturbed(seed: int, scale: float = 0.05, cache: Path | None = None) -> Path:
    """demo-base with seeded noise added to every weight (``scale`` of each tensor's spread): a
    model that differs from its base but was trained on no image at all, the cheapest
    non-member suspect there is."""
    from cgidm_core.demo import demo_model_path
    from cgidm_core.training import load_pipeline_parts, save_pipeline
    from cgidm_testkit.tinymodels import perturb_

    out = (cache or DEFAULT_CACHE) / f"perturbed-s{seed}-x{scale:g}"
    if (out / "model_index.json").is_file():
        return out
    unet, scheduler = load_pipeline_parts(demo_model_path("demo-base"))
    perturb_(unet, seed, scale)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    save_pipeline(unet, scheduler, tmp)
    tmp.rename(out)
    return out
