"""The benchmark suite's latent pairs: LoRA, DreamBooth and captioned style fine-tunes of
``demo-latent-base`` on the Van Gogh members, each labelled with its recipe group.

Why a module of its own next to :mod:`cgidm_core.suite_pairs`: the pixel suite's pairs are
full fine-tunes of one recipe at three strengths; these are the recipes people publish, each
saved in the format its trainer writes and loaded by cgidm as a user's file (a LoRA is never
merged here). ``group`` is the recipe group the leave-one-group-out selection holds out
(``lora-attn``, ``lora-attn-conv``, ``lora-kohya``, ``dreambooth``, ``dreambooth-prior``,
``style-captioned``).

Strength is a continuum: every run saves checkpoints at several step counts (constant learning
rate, no warm-up, so a checkpoint after N steps equals an N-step run), and each checkpoint's
training.json records the drop of the members' loss, the x-axis the AUCs are plotted against.

Learning rates are the usual trainers' defaults: 1e-4 for a LoRA (diffusers'
train_text_to_image_lora and kohya's unet_lr), 5e-6 for full DreamBooth (diffusers'
train_dreambooth README), 1e-5 for a captioned fine-tune (train_text_to_image README); batch 4.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .latent_finetune import LatentRecipe
from .suite_pairs import _images, default_cache, default_data_root

#: The base every latent pair is fine-tuned from.
LATENT_BASE = "demo-latent-base"
#: Step counts saved by every run (the strength continuum).
CHECKPOINTS: tuple[int, ...] = (100, 300, 1000)
SEEDS: tuple[int, ...] = (0, 1)
#: Step counts of the strength continuum's runs (``continuum_pairs``): dense, from 0 (a LoRA
#: whose B matrices are still zero, i.e. the base itself: the control where every method must
#: give 0.5) to twice the suite's longest run.
CONTINUUM_CHECKPOINTS: tuple[int, ...] = (0, 25, 50, 100, 200, 300, 500, 1000, 2000)
#: The recipes run densely: the weakest LoRA placement of the suite (attention only, rank 16).
CONTINUUM_RECIPES: tuple[str, ...] = ("lora-attn-r16",)


def _lora(rank: int, targets: str, **kw: Any) -> LatentRecipe:
    return LatentRecipe("lora", max(CHECKPOINTS), 1e-4, rank=rank, targets=targets, **kw)


#: recipe name -> (group, recipe).
RECIPES: dict[str, tuple[str, LatentRecipe]] = {
    **{f"lora-attn-r{r}": ("lora-attn", _lora(r, "attn")) for r in (4, 16, 64)},
    **{f"lora-attn-conv-r{r}": ("lora-attn-conv", _lora(r, "attn_conv")) for r in (4, 16, 64)},
    # kohya's layout, trained with alpha = rank / 2 so a loader that ignored alpha would double
    # the adapter's effect.
    **{f"kohya-attn-conv-r{r}": ("lora-kohya", _lora(r, "attn_conv", lora_alpha=r / 2,
                                                     save_as="kohya")) for r in (16,)},
    "dreambooth": ("dreambooth", LatentRecipe("full", max(CHECKPOINTS), 5e-6,
                                              save_as="pipeline")),
    "dreambooth-prior": ("dreambooth-prior", LatentRecipe(
        "full", max(CHECKPOINTS), 5e-6, save_as="pipeline", prior_preservation=True)),
    "style-captioned": ("style-captioned", LatentRecipe(
        "full", max(CHECKPOINTS), 1e-5, save_as="pipeline", captions="per_image")),
}


def _base_fingerprint() -> str:
    """Hash of the base's weights' sizes and config: a retrained base gets new fine-tunes."""
    from .demo import resolve_model_reference

    base = resolve_model_reference(LATENT_BASE)
    h = hashlib.sha256()
    for p in sorted(base.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".txt"):
            h.update(f"{p.relative_to(base)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class LatentSuitePair:
    """One checkpoint of one recipe and seed, evaluated members vs the authors' hold-out."""

    recipe_name: str
    steps: int
    seed: int
    members: tuple[Path, ...]
    holdout_files: tuple[Path, ...]
    #: The step counts the run saves; the suite's ``CHECKPOINTS`` unless a continuum run.
    checkpoints: tuple[int, ...] = CHECKPOINTS

    @property
    def continuum(self) -> bool:
        return self.checkpoints != CHECKPOINTS

    @property
    def group(self) -> str:
        return RECIPES[self.recipe_name][0]

    @property
    def recipe(self) -> LatentRecipe:
        recipe = RECIPES[self.recipe_name][1]
        # a continuum run trains as long as its last checkpoint (same lr, constant schedule)
        return (dataclasses.replace(recipe, steps=max(self.checkpoints)) if self.continuum
                else recipe)

    @property
    def base(self) -> str:
        return LATENT_BASE

    @property
    def pair_id(self) -> str:
        """Stable name, e.g. ``latent/lora-attn-r16/300/s0`` (``latent-continuum/...`` for a
        checkpoint of a continuum run)."""
        family = "latent-continuum" if self.continuum else "latent"
        return f"{family}/{self.recipe_name}/{self.steps}/s{self.seed}"

    @property
    def run_key(self) -> str:
        """Hash of the recipe, data, seed and base: the cache folder of the run."""
        blob = json.dumps({"recipe": self.recipe.to_dict(), "seed": self.seed,
                           "data": [f"{p.name}:{p.stat().st_size}" for p in self.members],
                           "checkpoints": self.checkpoints, "base": _base_fingerprint()},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def run_dir(self, cache: Path) -> Path:
        kind = "-continuum" if self.continuum else ""
        return cache / "latent" / f"{self.recipe_name}{kind}-s{self.seed}-{self.run_key}"

    def model_dir(self, cache: Path) -> Path:
        """What ``--finetuned`` gets: a folder (diffusers LoRA, pipeline) or a kohya file."""
        folder = self.run_dir(cache) / str(self.steps)
        return folder / "sks_style.safetensors" if self.recipe.save_as == "kohya" else folder

    def facts_file(self, cache: Path) -> Path:
        return self.run_dir(cache) / str(self.steps) / "training.json"


def latent_suite_pairs(data_root: Path | None = None, *, recipes: tuple[str, ...] | None = None,
                       steps: tuple[int, ...] | None = None,
                       seeds: tuple[int, ...] | None = None) -> list[LatentSuitePair]:
    """Every latent pair (or a subset), in a fixed order."""
    root = Path(data_root) if data_root is not None else default_data_root()
    vg = root / "wikiart-vangogh"
    members, holdout = tuple(_images(vg / "membership")), tuple(_images(vg / "hold_out"))
    for name in recipes or ():
        if name not in RECIPES:
            raise ConfigError(f"unknown latent recipe {name!r}; choose from {', '.join(RECIPES)}")
    for s in steps or ():
        if s not in CHECKPOINTS:
            raise ConfigError(f"unknown step count {s}; choose from {CHECKPOINTS}")
    return [LatentSuitePair(name, n, seed, members, holdout)
            for name in recipes or tuple(RECIPES)
            for n in steps or CHECKPOINTS
            for seed in seeds or SEEDS]


def continuum_pairs(data_root: Path | None = None, *, recipes: tuple[str, ...] | None = None,
                    steps: tuple[int, ...] | None = None,
                    seeds: tuple[int, ...] = (0,)) -> list[LatentSuitePair]:
    """The strength continuum: every checkpoint of one run per recipe and seed, from the
    untrained adapter (0 steps) to ``max(CONTINUUM_CHECKPOINTS)``. Not part of the
    leave-one-group-out table (its pairs would count one run many times)."""
    for s in steps or ():
        if s not in CONTINUUM_CHECKPOINTS:
            raise ConfigError(f"unknown step count {s}; choose from {CONTINUUM_CHECKPOINTS}")
    base = latent_suite_pairs(data_root, recipes=recipes or CONTINUUM_RECIPES,
                              steps=(CHECKPOINTS[0],), seeds=seeds)
    return [dataclasses.replace(p, steps=n, checkpoints=CONTINUUM_CHECKPOINTS)
            for p in base for n in steps or CONTINUUM_CHECKPOINTS]


def train_run(pair: LatentSuitePair, cache: Path | None = None, *,
              log: Callable[[str], None] = print) -> dict[int, Path]:
    """Train the run of ``pair`` (its recipe and seed), saving every missing checkpoint."""
    from .demo import resolve_model_reference
    from .latent_finetune import finetune

    cache = cache or default_cache()
    run = pair.run_dir(cache)
    outs = {n: dataclasses.replace(pair, steps=n).model_dir(cache) for n in pair.checkpoints}
    missing = {n: out for n, out in outs.items()
               if not (run / str(n) / "training.json").is_file()}
    if missing:
        # A run replays from step 0; checkpoints already there are rewritten identically.
        finetune(resolve_model_reference(LATENT_BASE), pair.members, pair.recipe, pair.seed,
                 outs, log=log)
    return outs


__all__ = ["LATENT_BASE", "CHECKPOINTS", "CONTINUUM_CHECKPOINTS", "CONTINUUM_RECIPES", "SEEDS",
           "RECIPES", "LatentSuitePair", "latent_suite_pairs", "continuum_pairs", "train_run",
           "default_cache"]
