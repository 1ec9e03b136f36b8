"""Fine-tunes of the latent demo base the way the ecosystem's trainers make them, saved the way
they save them: peft LoRA (diffusers' ``save_lora_weights`` file, or a kohya ``lora_unet_*``
file with ``alpha`` tensors), DreamBooth (full UNet, trigger prompt, optional prior
preservation on class images the base generates), and a captioned style fine-tune.

Why: a membership verdict measured only on full fine-tunes of a pixel model says nothing about
the LoRA files users actually bring. These fine-tunes are loaded by cgidm exactly as a user's
file would be (never merged here), so the measurement covers the loaders too.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cgidm_core import latent_training as lt
from cgidm_core import training

if TYPE_CHECKING:  # annotations only; mypy reads diffusers as Any (pyproject.toml)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

#: peft target modules of the two LoRA placements. "attn": the attention projections of every
#: transformer block (diffusers' train_dreambooth_lora / train_text_to_image_lora default);
#: "attn_conv": those plus the ResNet convolutions and the transformer's proj_in/proj_out
#: (kohya's LoCon-style "conv" LoRA, what many Civitai LoRAs carry).
LORA_TARGETS = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn_conv": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut",
                  "proj_in", "proj_out"),
}


@dataclass(frozen=True)
class LatentRecipe:
    """How one fine-tune is trained and saved.

    ``kind``: "lora" (peft adapter on the UNet) or "full" (every UNet weight: DreamBooth or a
    style fine-tune). ``save_as``: "diffusers" (a folder with pytorch_lora_weights.safetensors),
    "kohya" (one .safetensors with lora_unet_* keys and alpha), "pipeline" (a complete
    StableDiffusionPipeline folder). ``captions``: "trigger" (every image captioned with the
    trigger prompt) or "per_image" (a caption per painting made from its title, plus the
    trigger words). ``lora_alpha`` 0 means alpha = rank (diffusers' scripts).
    """

    kind: str
    steps: int
    learning_rate: float
    batch_size: int = 4
    rank: int = 0
    targets: str = "attn"
    lora_alpha: float = 0.0
    save_as: str = "diffusers"
    captions: str = "trigger"
    prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    class_images: int = 20
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def alpha(self) -> float:
        return self.lora_alpha or float(self.rank)


def caption_of(path: Path) -> str:
    """A per-image caption from a painting's file name (title words, no year), with the trigger:
    what a captioned style fine-tune (e.g. BLIP captions + a style token) trains on."""
    words = [w for w in path.stem.replace("_", "-").split("-") if w and not w.isdigit()]
    return f"a painting of {' '.join(words[:6])} in sks style"


def _member_latents(vae: AutoencoderKL, files: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of each member's latent (cgidm's preprocessing), sampled per step
    as diffusers' trainers sample ``latent_dist`` every step."""
    from cgidm_core.images import load_image, to_tensor

    images = to_tensor([load_image(p) for p in files], lt.LATENT_IMAGE_SIZE)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    return posterior.mean, posterior.std


def _class_latents(parts: lt.LatentParts, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DreamBooth's class images: ``n`` images the base draws from the class prompt, encoded."""
    images = torch.cat([
        lt.generate(parts.unet, parts.text_encoder, parts.tokenizer, parts.vae, parts.scheduler,
                    [lt.CLASS_PROMPT] * min(10, n - i), seed=seed + i, steps=25)
        for i in range(0, n, 10)])
    with torch.no_grad():
        posterior = parts.vae.encode(images).latent_dist
    return posterior.mean, posterior.std


def add_lora(unet: UNet2DConditionModel, recipe: LatentRecipe) -> list[torch.nn.Parameter]:
    """Attach a peft LoRA (B = 0 at start, as peft initialises it) and freeze everything else."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, init_lora_weights=True,
                                target_modules=list(LORA_TARGETS[recipe.targets])))
    return [p for p in unet.parameters() if p.requires_grad]


def finetune(base: str | Path, members: Sequence[Path], recipe: LatentRecipe, seed: int,
             checkpoints: dict[int, Path], *, log: Callable[[str], None] = print,
             loss_samples: int = 64) -> dict[int, dict[str, Any]]:
    """Fine-tune the base on ``members`` with ``recipe``; save at each step count in
    ``checkpoints`` (steps -> output path). Returns facts for training.json (also written next
    to each output), including the members' loss drop measured with common random numbers."""
    parts = lt.load_parts(base)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data_rng = torch.Generator().manual_seed(seed + 1)
    scaling = float(parts.vae.config.scaling_factor)
    mean, std = _member_latents(parts.vae, members)
    member_latents = mean * scaling
    captions = ([caption_of(p) for p in members] if recipe.captions == "per_image"
                else [lt.TRIGGER_PROMPT] * len(members))
    with torch.no_grad():
        hidden = lt.encode_text(parts.text_encoder, parts.tokenizer, captions)
        class_hidden = lt.encode_text(parts.text_encoder, parts.tokenizer, [lt.CLASS_PROMPT])
    if recipe.prior_preservation:
        class_mean, class_std = _class_latents(parts, recipe.class_images, seed + 1000)
    unet = parts.unet
    before = _loss_of(unet, parts.scheduler, member_latents, hidden, loss_samples)
    params = add_lora(unet, recipe) if recipe.kind == "lora" else list(unet.parameters())
    unet.train()
    n = len(members)

    def step_loss(_step: int) -> torch.Tensor:
        idx = torch.randint(0, n, (recipe.batch_size,), generator=data_rng)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)) * scaling
        loss = lt.latent_denoising_loss(unet, parts.scheduler, z, hidden[idx], generator)
        if recipe.prior_preservation:
            cidx = torch.randint(0, len(class_mean), (recipe.batch_size,), generator=data_rng)
            cz = (class_mean[cidx] + class_std[cidx]
                  * torch.randn(class_mean[cidx].shape, generator=generator)) * scaling
            loss = loss + recipe.prior_loss_weight * lt.latent_denoising_loss(
                unet, parts.scheduler, cz, class_hidden.expand(len(cidx), -1, -1), generator)
        return loss

    started = time.perf_counter()
    facts_by_steps: dict[int, dict[str, Any]] = {}

    def on_step(done: int, losses: list[float]) -> None:
        if done not in checkpoints:
            return
        unet.eval()
        after = _loss_of(unet, parts.scheduler, member_latents, hidden, loss_samples)
        facts = {
            "recipe": recipe.to_dict(), "seed": seed, "steps": done,
            "members": [p.name for p in members], "captions": sorted(set(captions)),
            "instance_prompt": lt.TRIGGER_PROMPT,
            # DreamBooth's prior preservation: what the class term of the loss trained on
            "class_prompt": lt.CLASS_PROMPT if recipe.prior_preservation else None,
            "class_images": len(class_mean) if recipe.prior_preservation else 0,
            "members_loss_before": before, "members_loss_after": after,
            "members_loss_drop": before - after,
            "members_loss_drop_relative": (before - after) / before,
            "final_train_loss": float(np.mean(losses[-50:])) if losses else None,
            "seconds": time.perf_counter() - started,
            "torch_threads": torch.get_num_threads(),
        }
        save(parts, unet, recipe, checkpoints[done], facts)
        facts_by_steps[done] = facts
        log(f"saved {checkpoints[done]} after {done} steps, members' loss "
            f"{before:.4f} -> {after:.4f} ({facts['seconds']:.0f} s)")
        unet.train()

    if 0 in checkpoints:
        # The untrained fine-tune (a LoRA's B matrices are zero: the base itself): the control
        # of the strength continuum, where every membership score must be at chance.
        on_step(0, [])
    config = training.TrainConfig(max(checkpoints), recipe.batch_size, recipe.learning_rate,
                                  seed=seed, warmup_steps=recipe.warmup_steps,
                                  lr_schedule=recipe.lr_schedule, grad_clip=recipe.grad_clip)
    training.optimise(params, config, step_loss, description=recipe.kind, progress=False,
                      on_step=on_step)
    return facts_by_steps


@torch.no_grad()
def _loss_of(unet: UNet2DConditionModel, scheduler: DDPMScheduler, latents: torch.Tensor,
             hidden: torch.Tensor,
             samples: int = 64, seed: int = 4321) -> float:
    """Mean epsilon loss of the members over fixed (t, noise) draws: the same draws before and
    after training, so the drop has no Monte Carlo noise of its own."""
    unet.eval()
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(samples // 8):
        lat = latents.repeat(8, 1, 1, 1)
        total += float(lt.latent_denoising_loss(unet, scheduler, lat, hidden.repeat(8, 1, 1),
                                                generator))
    return total / (samples // 8)


# ------------------------------------------------------------------------------------ saving


def _model_card(recipe: LatentRecipe, facts: dict[str, Any], fmt: str) -> str:
    what = {"lora": f"a rank-{recipe.rank} LoRA ({recipe.targets.replace('_', ' + ')})",
            "full": "a full UNet fine-tune"}[recipe.kind]
    prior = " with prior preservation on class images" if recipe.prior_preservation else ""
    return f"""# demo-latent fine-tune

{what}{prior} of `demo-latent-base` on {len(facts['members'])} Van Gogh paintings (its
known members), saved as {fmt}. Trained by `cgidm_core.latent_finetune` ({recipe.steps} steps
planned, this checkpoint after {facts['steps']}; lr {recipe.learning_rate}, batch
{recipe.batch_size}, seed {facts['seed']}).

instance_prompt: {lt.TRIGGER_PROMPT}

Members' epsilon loss (fixed draws): {facts['members_loss_before']:.4f} before,
{facts['members_loss_after']:.4f} after.
"""


def peft_to_kohya(state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft UNet LoRA keys -> kohya's ``lora_unet_<module_path_with_underscores>.lora_down/up``
    with one ``.alpha`` scalar per module (kohya sd-scripts' layout for SD 1.x)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        module, _, rest = key.partition(".lora_")
        name = "lora_unet_" + module.removeprefix("unet.").replace(".", "_")
        part = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[rest]
        out[f"{name}.{part}"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save(parts: lt.LatentParts, unet: UNet2DConditionModel, recipe: LatentRecipe, out: Path,
         facts: dict[str, Any]) -> Path:
    """Save one checkpoint in the recipe's format; ``out`` is a folder, or for kohya the
    .safetensors file (with training.json and README.md beside it in its folder)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    folder = out.parent if recipe.save_as == "kohya" else out
    if folder.exists() and recipe.save_as != "kohya":
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if recipe.kind == "lora":
        layers = get_peft_model_state_dict(unet)
        if recipe.save_as == "kohya":
            from safetensors.torch import save_file

            metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(recipe.rank),
                        "ss_network_alpha": str(recipe.alpha), "ss_output_name": "sks_style",
                        "ss_tag_frequency": json.dumps(
                            {"10_sks style": {lt.TRIGGER_PROMPT: len(facts["members"])}})}
            save_file(peft_to_kohya(layers, recipe.alpha), str(out), metadata=metadata)
            fmt = "a kohya file (lora_unet_* keys, alpha tensors)"
        else:
            # The adapter's config (rank, alpha, targets) goes into the file's header, as
            # diffusers' current training scripts write it.
            StableDiffusionPipeline.save_lora_weights(
                folder, unet_lora_layers=layers, safe_serialization=True,
                unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
            fmt = "diffusers' save_lora_weights format"
    else:
        lt.save_sd_pipeline(folder, unet=unet, vae=parts.vae, text_encoder=parts.text_encoder,
                            tokenizer=parts.tokenizer, scheduler=parts.scheduler)
        fmt = "a complete StableDiffusionPipeline folder"
    (folder / "README.md").write_text(_model_card(recipe, facts, fmt))
    (folder / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    return out
