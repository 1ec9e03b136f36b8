"""The benchmark suite's pixel LoRA pairs: peft LoRAs of ``demo-base`` on the Van Gogh members
(the authors' split A), each labelled with its recipe group.

Why a module next to :mod:`cgidm_core.suite_pairs`: those pairs are full fine-tunes with one
recipe; these are the LoRA recipes people publish (ranks 4, 16, 64; attention only, or attention
+ convolutions), trained with the usual trainers' defaults: AdamW at lr 1e-4 constant, no
warm-up (diffusers' ``train_text_to_image_lora`` / ``train_dreambooth_lora`` and kohya's
``unet_lr``), alpha = rank, batch 4, no flips (the latent family's LoRA recipe, so the two
families' LoRA pairs differ by the model, not the recipe). Every run saves checkpoints at
:data:`CHECKPOINTS` steps (a constant schedule: a checkpoint after N steps equals an N-step run);
the suite evaluates :data:`EVALUATED_STEPS`.

Each checkpoint folder holds the LoRA in diffusers' format and as a kohya file, and ``merged/``:
the diffusers file merged into ``demo-base`` (:func:`cgidm_core.pixel_lora.merge_lora_file`),
which is what the suite loads, because cgidm's loaders do not attach a LoRA to a pixel model.
The kohya file merges to the same weights (a test checks it), so it is not a pair of its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .pixel_lora import MERGED_DIR, PixelLoraRecipe
from .suite_pairs import Split, default_cache, splits

#: Step counts saved by every run; the one the suite evaluates.
CHECKPOINTS: tuple[int, ...] = (300, 1000)
EVALUATED_STEPS = 1000
#: The data split every LoRA pair trains on and is measured against.
SPLIT = "vangogh-a"

#: recipe name -> (recipe group, recipe).
RECIPES: dict[str, tuple[str, PixelLoraRecipe]] = {
    **{f"lora-attn-r{r}": ("lora-attn", PixelLoraRecipe(r, "attn")) for r in (4, 16, 64)},
    **{f"lora-attn-conv-r{r}": ("lora-attn-conv", PixelLoraRecipe(r, "attn_conv"))
       for r in (4, 16, 64)},
}

#: The set the suite runs by default, in the order it trains them (what fitted one session's
#: CPU budget on 2 shared cores: both placements at ranks 4, 16 and 64, rank 16 of each at a
#: second seed).
DEFAULT_SET: tuple[tuple[str, int], ...] = (
    ("lora-attn-r16", 0), ("lora-attn-conv-r16", 0), ("lora-attn-r4", 0),
    ("lora-attn-r64", 0), ("lora-attn-r16", 1), ("lora-attn-conv-r4", 0),
    ("lora-attn-conv-r16", 1), ("lora-attn-conv-r64", 0),
)


def _base_fingerprint() -> str:
    from .demo import resolve_model_reference

    base = resolve_model_reference("demo-base")
    h = hashlib.sha256()
    for p in sorted(base.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".safetensors"):
            h.update(f"{p.relative_to(base)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class PixelLoraPair:
    """One LoRA checkpoint evaluated members vs the split's hold-out. Has the attributes of
    :class:`cgidm_core.suite_pairs.SuitePair` that ``benchmarks/suite.py`` reads (``split``,
    ``strength``, ``seed``, ``holdout``, ``recipe_group``, ``family``, ``model_dir``)."""

    split: Split
    recipe_name: str
    steps: int
    seed: int
    holdout: str = "holdout"
    family: str = "pixel"

    @property
    def recipe(self) -> PixelLoraRecipe:
        return RECIPES[self.recipe_name][1]

    @property
    def recipe_group(self) -> str:
        return RECIPES[self.recipe_name][0]

    @property
    def group(self) -> str:
        return self.recipe_group

    @property
    def strength(self) -> str:
        return f"lora-{self.steps}"

    @property
    def pair_id(self) -> str:
        """Stable name, e.g. ``vangogh-a/lora-attn-r16/1000/s0/holdout``."""
        return f"{self.split.name}/{self.recipe_name}/{self.steps}/s{self.seed}/{self.holdout}"

    @property
    def run_key(self) -> str:
        blob = json.dumps({"recipe": self.recipe.to_dict(), "seed": self.seed,
                           "data": self.split.fingerprint(), "checkpoints": CHECKPOINTS,
                           "base": _base_fingerprint()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def run_dir(self, cache: Path) -> Path:
        return cache / "pixel-lora" / f"{self.recipe_name}-s{self.seed}-{self.run_key}"

    def checkpoint_dir(self, cache: Path) -> Path:
        """The LoRA files (diffusers, kohya) and ``training.json`` of this checkpoint."""
        return self.run_dir(cache) / str(self.steps)

    def model_dir(self, cache: Path) -> Path:
        """What the suite loads: the merged pipeline folder."""
        return self.checkpoint_dir(cache) / MERGED_DIR

    @property
    def holdout_files(self) -> tuple[Path, ...]:
        return self.split.holdouts[self.holdout]


def pixel_lora_pairs(data_root: Path | None = None, *,
                     runs: tuple[tuple[str, int], ...] | None = None,
                     steps: int = EVALUATED_STEPS) -> list[PixelLoraPair]:
    """The LoRA pairs of ``runs`` ((recipe name, seed); default :data:`DEFAULT_SET`)."""
    chosen = runs if runs is not None else DEFAULT_SET
    for name, _seed in chosen:
        if name not in RECIPES:
            raise ConfigError(f"unknown pixel LoRA recipe {name!r}; choose from "
                              f"{', '.join(RECIPES)}")
    if steps not in CHECKPOINTS:
        raise ConfigError(f"unknown step count {steps}; choose from {CHECKPOINTS}")
    split = splits(data_root)[SPLIT]
    return [PixelLoraPair(split, name, steps, seed) for name, seed in chosen]


def train_run(pair: PixelLoraPair, cache: Path | None = None, *,
              log: Callable[[str], None] = print) -> dict[int, Path]:
    """Train the run of ``pair`` (recipe, seed) unless every checkpoint is already cached."""
    from .demo import resolve_model_reference
    from .pixel_lora import finetune

    cache = cache or default_cache()
    outs = {n: pair.run_dir(cache) / str(n) for n in CHECKPOINTS}
    if all((out / "training.json").is_file() for out in outs.values()):
        return outs
    finetune(resolve_model_reference("demo-base"), pair.split.members, pair.recipe, pair.seed,
             outs, log=log)
    return outs


__all__ = ["CHECKPOINTS", "EVALUATED_STEPS", "RECIPES", "DEFAULT_SET", "PixelLoraPair",
           "pixel_lora_pairs", "train_run"]
