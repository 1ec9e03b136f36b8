"""The 50-model audit set: fine-tunes of the pixel demo base (``demo-base``), a few trained on the
portfolio (the Van Gogh split A members), the rest on other images, mostly LoRAs.

    python -m benchmarks.audit_set            # build what is missing, print the set
    python -m benchmarks.audit_set --list     # print the set and what is built, build nothing
    python -m benchmarks.audit_set --models-json models.json   # ... and write it for `cgidm audit`

What it holds (:func:`audit_set`), all seeded, made with the project's training code:

- 5 members (trained on ``wikiart-vangogh/membership``, the audit's portfolio): 3 pixel LoRAs
  (attention + convolutions, ranks 16/8/4, lr 1e-3 constant, batch 4, 300/300/200 steps) and 2
  full fine-tunes (150 and 300 steps, lr 2e-4: ``cgidm_testkit.audit_family``).
- 45 non-members: 39 LoRAs of the same placement on other photos (the 20 DreamBooth subjects at
  rank 8, 18 of them again at rank 4 with another seed, the DreamBooth dog at rank 16; 100
  steps, lr 1e-3, batch 4) and 6 full fine-tunes on DreamBooth subjects (60 steps).

The LoRAs are saved as a user would upload them: diffusers' ``pytorch_lora_weights.safetensors``
(``cgidm_core.pixel_lora.save_lora``, which also writes the kohya file beside it), one folder per
model under ``~/.cache/cgidm/audit50`` (``$CGIDM_AUDIT50_CACHE``), with ``training.json`` (recipe,
seconds, final loss). The full fine-tunes are pipeline folders in ``~/.cache/cgidm/audit-family``
(shared with ``benchmarks/audit.py``'s 16-model family, so they are made once). There are only 20
Van Gogh paintings in the shared data (10 portfolio, 10 controls), so no non-member was trained
on other Van Gogh paintings.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cgidm_core.suite_pairs import default_data_root

SHARED_DATA = default_data_root()
PORTFOLIO = SHARED_DATA / "wikiart-vangogh" / "membership"
CONTROLS = SHARED_DATA / "wikiart-vangogh" / "hold_out"
SUBJECTS = SHARED_DATA / "dreambooth-subjects"
DOG = SHARED_DATA / "dreambooth-dog" / "membership"
CACHE = Path(os.environ.get("CGIDM_AUDIT50_CACHE")
             or Path.home() / ".cache" / "cgidm" / "audit50")
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class LoraSpec:
    """One pixel LoRA of demo-base: attention + convolution layers (``attn_conv``), AdamW at a
    constant learning rate, no warm-up, alpha = rank."""

    images: str  # folder
    rank: int
    steps: int
    seed: int
    learning_rate: float = 1e-3
    batch_size: int = 4
    targets: str = "attn_conv"

    @property
    def name(self) -> str:
        folder = Path(self.images)
        # "membership" alone would not say whose: the portfolio's, or the DreamBooth dog's
        tag = f"{folder.parent.name}-{folder.name}" if folder.name == "membership" else folder.name
        return f"lora-{tag}-{self.targets}-r{self.rank}-s{self.steps}-seed{self.seed}"

    def folder(self) -> Path:
        return CACHE / self.name


@dataclass(frozen=True)
class SetModel:
    """One model of the set: its label, whether it was trained on the portfolio, how to make it."""

    label: str
    member: bool
    lora: LoraSpec | None = None
    full_images: str | None = None
    full_steps: int = 0

    @property
    def kind(self) -> str:
        return "lora" if self.lora else "full"


def audit_set() -> list[SetModel]:
    """The 50 models, members first."""
    portfolio = str(PORTFOLIO)
    out = [SetModel(f"member-lora-r{r}-{steps}", True, LoraSpec(portfolio, r, steps, seed))
           for r, steps, seed in ((16, 300, 0), (8, 300, 1), (4, 200, 2))]
    out += [SetModel(f"member-full-{steps}", True, full_images=portfolio, full_steps=steps)
            for steps in (150, 300)]
    subjects = sorted(p.name for p in SUBJECTS.iterdir() if p.is_dir())
    out += [SetModel(f"{s}-lora-r8", False, LoraSpec(str(SUBJECTS / s), 8, 100, 0))
            for s in subjects]
    out += [SetModel(f"{s}-lora-r4", False, LoraSpec(str(SUBJECTS / s), 4, 100, 1))
            for s in subjects[:18]]
    out.append(SetModel("dreambooth-dog-lora-r16", False, LoraSpec(str(DOG), 16, 100, 0)))
    out += [SetModel(f"{s}-full-60", False, full_images=str(SUBJECTS / s), full_steps=60)
            for s in ("dog", "cat", "backpack", "clock", "can", "bear_plushie")]
    return out


def _full_recipe(model: SetModel):
    from cgidm_testkit.audit_family import FinetuneRecipe

    assert model.full_images is not None
    return FinetuneRecipe(images=model.full_images, steps=model.full_steps)


def reference(model: SetModel) -> Path:
    """The fine-tune's path as an audit's model list gives it (the LoRA file, or the pipeline
    folder of a full fine-tune); it may not exist yet."""
    if model.lora is not None:
        return model.lora.folder() / LORA_FILE
    from cgidm_testkit.audit_family import DEFAULT_CACHE

    return DEFAULT_CACHE / _full_recipe(model).key()


def is_built(model: SetModel) -> bool:
    path = reference(model)
    return path.is_file() if model.lora is not None else (path / "model_index.json").is_file()


def train_lora(spec: LoraSpec) -> Path:
    """Train one LoRA on demo-base with the project's loop and save it (diffusers + kohya)."""
    import numpy as np
    import torch

    from cgidm_core import training
    from cgidm_core.demo import resolve_model_reference
    from cgidm_core.pixel_lora import PixelLoraRecipe, add_lora, save_lora

    out = spec.folder()
    if (out / LORA_FILE).is_file():
        return out / LORA_FILE
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    unet, scheduler = training.load_pipeline_parts(resolve_model_reference("demo-base"))
    _, images = training.load_images_as_tensor(spec.images, unet.config.sample_size)
    recipe = PixelLoraRecipe(spec.rank, spec.targets, learning_rate=spec.learning_rate,
                             batch_size=spec.batch_size)
    params = add_lora(unet, recipe)
    data = training.FixedImages(images, seed=spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    config = training.TrainConfig(spec.steps, spec.batch_size, spec.learning_rate,
                                  seed=spec.seed, warmup_steps=0, lr_schedule="constant")
    unet.train()
    losses = training.optimise(
        params, config,
        lambda _step: training.ddpm_loss(unet, scheduler, data(spec.batch_size), generator),
        description=spec.name, progress=False)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    save_lora(unet, recipe, tmp)
    facts = {"spec": asdict(spec), "images": len(images),
             "final_train_loss": float(np.mean(losses[-50:])),
             "seconds": round(time.perf_counter() - started, 1),
             "torch_threads": torch.get_num_threads()}
    (tmp / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    try:
        tmp.rename(out)
    except OSError:
        # two builders at once (the cache is shared): the other one finished this seeded recipe
        # first; keep its folder (the same seeded recipe) and drop ours
        if not (out / LORA_FILE).is_file():
            raise
        import shutil

        shutil.rmtree(tmp)
    return out / LORA_FILE


def build(model: SetModel) -> Path:
    if model.lora is not None:
        return train_lora(model.lora)
    from cgidm_testkit.audit_family import make_finetune

    return make_finetune(_full_recipe(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the set; build nothing")
    parser.add_argument("--models-json", type=Path,
                        help="also write the set as a `cgidm audit --models` list to this file")
    args = parser.parse_args()
    models = audit_set()
    total = time.perf_counter()
    for i, model in enumerate(models):
        if not args.list and not is_built(model):
            t0 = time.perf_counter()
            build(model)
            print(f"[{i + 1:2d}/{len(models)}] built {model.label} in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\n{'label':<34} {'member':>6} {'kind':>5} built  reference")
    for model in models:
        print(f"{model.label:<34} {'yes' if model.member else 'no':>6} {model.kind:>5} "
              f"{'yes' if is_built(model) else 'no':>5}  {reference(model)}")
    if args.models_json:
        args.models_json.write_text(json.dumps(
            [{"pretrained": "demo-base", "finetuned": str(reference(m))} for m in models],
            indent=1) + "\n")
        print(f"wrote {args.models_json}")
    if not args.list:
        print(f"\nbuilt/found {len(models)} models in {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
