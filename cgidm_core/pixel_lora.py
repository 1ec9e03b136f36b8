"""LoRA fine-tunes of the pixel demo model (``demo-base``), saved as the ecosystem saves them, and
merged back into a plain pixel pipeline folder so cgidm's pixel loader can read them.

Why: the suite's pixel pairs were all full fine-tunes. The LoRA recipes people publish (peft,
ranks 4-64, on attention only or attention + convolutions, as a diffusers
``pytorch_lora_weights.safetensors`` or a kohya ``lora_unet_*`` file) have to be in the suite for
the pixel family too. The suite merges a pixel LoRA here (:func:`merge_lora_file`: W + alpha /
r * B A per adapted layer, through peft) and loads the merged pipeline; both file formats merge
through the same function, which is what a test checks. (diffusers gives ``UNet2DModel`` no LoRA
loader; cgidm's own, :mod:`cgidm_core.models.pixel_lora_loading`, now attaches these files
unmerged for ``cgidm check`` and audits, and computes what the merge computes.)

The demo UNet's only attention is in its mid block (8 x 8, 64 channels): an "attention-only"
LoRA adapts 4 linear layers there; "attention + convolutions" also adapts every ResNet
convolution (kohya's LoCon-style placement).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import training
from .errors import ModelFormatError

if TYPE_CHECKING:  # annotations only; mypy reads peft as Any (pyproject.toml)
    from peft import LoraConfig

#: peft target modules of the two placements (the pixel UNet has no proj_in / proj_out).
PIXEL_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn_conv": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut"),
}
#: File names inside a checkpoint folder.
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pixel_lora_kohya.safetensors"
MERGED_DIR = "merged"


@dataclass(frozen=True)
class PixelLoraRecipe:
    """One LoRA training recipe on the pixel model. ``lora_alpha`` 0 means alpha = rank
    (diffusers' scripts); the schedule is constant without warm-up, so a checkpoint after N steps
    equals an N-step run."""

    rank: int
    targets: str
    learning_rate: float = 1e-4
    batch_size: int = 4
    lora_alpha: float = 0.0
    flip: bool = False
    grad_clip: float = 1.0

    @property
    def alpha(self) -> float:
        return self.lora_alpha or float(self.rank)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lora_config(rank: int, alpha: float, targets: Sequence[str]) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                      target_modules=list(targets))


def add_lora(unet: torch.nn.Module, recipe: PixelLoraRecipe) -> list[torch.nn.Parameter]:
    """Inject a peft LoRA (B = 0 at start) into ``unet`` in place, freezing everything else."""
    from peft import inject_adapter_in_model

    unet.requires_grad_(False)
    inject_adapter_in_model(lora_config(recipe.rank, recipe.alpha,
                                        PIXEL_LORA_TARGETS[recipe.targets]), unet)
    return [p for p in unet.parameters() if p.requires_grad]


def save_lora(unet: torch.nn.Module, recipe: PixelLoraRecipe, folder: Path) -> tuple[Path, Path]:
    """Write the adapter twice: diffusers' format (``save_lora_weights``: ``unet.*.lora_A/B``
    keys, the adapter config in the header) and a kohya file (``lora_unet_*`` keys, one alpha
    per module). Returns (diffusers file, kohya file)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from .latent_finetune import peft_to_kohya

    folder.mkdir(parents=True, exist_ok=True)
    layers = get_peft_model_state_dict(unet)
    metadata = {"r": recipe.rank, "lora_alpha": recipe.alpha,
                "target_modules": list(PIXEL_LORA_TARGETS[recipe.targets])}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers,
                                              safe_serialization=True,
                                              unet_lora_adapter_metadata=metadata)
    kohya = folder / KOHYA_FILE
    save_file(peft_to_kohya(layers, recipe.alpha), str(kohya),
              metadata={"ss_network_module": "networks.lora",
                        "ss_network_dim": str(recipe.rank),
                        "ss_network_alpha": str(recipe.alpha)})
    return folder / DIFFUSERS_FILE, kohya


def read_lora_file(path: Path, unet: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int, float]:
    """A pixel LoRA file (diffusers or kohya layout) as peft's state dict for ``unet`` (keys
    ``<module>.lora_A.weight`` / ``lora_B.weight``), its rank and its alpha.

    kohya names are the module path with dots as underscores; they are mapped back through the
    UNet's own module names, so a name that fits no module is refused, never dropped."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    tensors = load_file(str(path))
    if not tensors:
        raise ModelFormatError(f"{path} holds no tensors")
    if all(k.startswith("lora_unet_") for k in tensors):
        modules = {"lora_unet_" + name.replace(".", "_"): name
                   for name, _ in unet.named_modules() if name}
        state: dict[str, torch.Tensor] = {}
        alphas: set[float] = set()
        for key, value in tensors.items():
            stem, _, part = key.partition(".")
            if stem not in modules:
                raise ModelFormatError(f"{path}: {stem} fits no layer of the pixel UNet")
            if part == "alpha":
                alphas.add(float(value))
                continue
            peft_part = {"lora_down.weight": "lora_A.weight",
                         "lora_up.weight": "lora_B.weight"}.get(part)
            if peft_part is None:
                raise ModelFormatError(f"{path}: {key} is not a LoRA down/up weight")
            state[f"{modules[stem]}.{peft_part}"] = value
        ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
        if len(ranks) != 1 or len(alphas) > 1:
            raise ModelFormatError(f"{path}: mixed ranks {ranks} or alphas {alphas}; "
                                   "merge supports one rank and alpha per file")
        rank = ranks.pop()
        return state, rank, alphas.pop() if alphas else float(rank)
    if all(k.startswith("unet.") and ".lora_" in k for k in tensors):
        state = {k.removeprefix("unet."): v for k, v in tensors.items()}
        ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
        if len(ranks) != 1:
            raise ModelFormatError(f"{path}: mixed ranks {ranks}; merge supports one rank")
        rank = ranks.pop()
        # diffusers writes the adapter config flattened: {"unet.r": 16, "unet.lora_alpha": ...}
        written = json.loads(header.get("lora_adapter_metadata") or "{}")
        alpha = written.get("unet.lora_alpha", (written.get("unet") or {}).get("lora_alpha"))
        return state, rank, float(alpha if alpha is not None else rank)
    raise ModelFormatError(f"{path} is neither a diffusers (unet.*.lora_A/B) nor a kohya "
                           "(lora_unet_*) LoRA file")


def merge_lora_file(path: Path, base_folder: Path) -> tuple[torch.nn.Module, object]:
    """The base pixel UNet with the LoRA file merged into its weights (peft's
    ``merge_and_unload``), and the base's scheduler."""
    from peft import get_peft_model, set_peft_model_state_dict

    unet, scheduler = training.load_pipeline_parts(base_folder)
    state, rank, alpha = read_lora_file(Path(path), unet)
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    model = get_peft_model(unet, lora_config(rank, alpha, targets))
    # a PeftModel's own keys carry the wrapper's prefix
    result = set_peft_model_state_dict(model, {f"base_model.model.{k}": v
                                               for k, v in state.items()})
    if result.unexpected_keys:
        raise ModelFormatError(f"{path}: keys that fit no adapted layer: "
                               f"{result.unexpected_keys[:3]}")
    merged = model.merge_and_unload()
    return merged.eval(), scheduler


def write_merged(path: Path, base_folder: Path, out: Path) -> Path:
    """Merge a pixel LoRA file into the base and save a DDPMPipeline folder cgidm loads."""
    unet, scheduler = merge_lora_file(path, base_folder)
    return training.save_pipeline(unet, scheduler, out)


def finetune(base_folder: Path, members: Sequence[Path], recipe: PixelLoraRecipe, seed: int,
             checkpoints: dict[int, Path], *, log: Callable[[str], None] = print,
             loss_samples: int = 64) -> dict[int, dict[str, Any]]:
    """Train a LoRA on ``members``; at each step count of ``checkpoints`` write, in that folder,
    the diffusers and kohya files, the merged pipeline (``merged/``) and ``training.json`` with
    the members' loss before and after (same (t, noise) draws: no Monte Carlo noise in the
    drop)."""
    from .images import load_image, to_tensor

    torch.manual_seed(seed)
    unet, scheduler = training.load_pipeline_parts(base_folder)
    images = to_tensor([load_image(p) for p in members], unet.config.sample_size)
    before = float(training.denoising_losses(unet, scheduler, images, samples=loss_samples,
                                             seed=4321).mean())
    params = add_lora(unet, recipe)
    n_params = sum(p.numel() for p in params)
    data = training.FixedImages(images, seed=seed, flip=recipe.flip)
    generator = torch.Generator().manual_seed(seed)
    config = training.TrainConfig(max(checkpoints), recipe.batch_size, recipe.learning_rate,
                                  seed=seed, warmup_steps=0, lr_schedule="constant",
                                  grad_clip=recipe.grad_clip)
    started = time.perf_counter()
    facts_by_steps: dict[int, dict[str, Any]] = {}

    def on_step(done: int, losses: list[float]) -> None:
        if done not in checkpoints:
            return
        folder = checkpoints[done]
        after = float(training.denoising_losses(unet, scheduler, images, samples=loss_samples,
                                                seed=4321).mean())
        diffusers_file, kohya_file = save_lora(unet, recipe, folder)
        trained = time.perf_counter() - started
        write_merged(diffusers_file, base_folder, folder / MERGED_DIR)
        facts = {"recipe": recipe.to_dict(), "seed": seed, "steps": done,
                 "members": [f"{p.parent.name}/{p.name}" for p in members],
                 "trainable_parameters": n_params,
                 "members_loss_before": before, "members_loss_after": after,
                 "members_loss_drop": before - after,
                 "members_loss_drop_relative": (before - after) / before,
                 "final_train_loss": float(np.mean(losses[-50:])), "seconds": trained,
                 "torch_threads": torch.get_num_threads(),
                 "files": {"diffusers": diffusers_file.name, "kohya": kohya_file.name,
                           "merged": MERGED_DIR},
                 "loaded_as": "merged into demo-base's weights (cgidm_core.pixel_lora."
                              "merge_lora_file): cgidm's loaders attach LoRAs to SD/SDXL/Flux, "
                              "not to a pixel UNet2DModel"}
        (folder / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
        (folder / MERGED_DIR / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
        facts_by_steps[done] = facts
        log(f"saved {folder} after {done} steps, members' loss {before:.4f} -> {after:.4f} "
            f"({trained:.0f} s)")
        unet.train()

    unet.train()
    training.optimise(
        params, config,
        lambda _step: training.ddpm_loss(unet, scheduler, data(recipe.batch_size), generator),
        description=f"pixel LoRA r{recipe.rank} {recipe.targets}", progress=False,
        on_step=on_step)
    return facts_by_steps


__all__ = ["PIXEL_LORA_TARGETS", "PixelLoraRecipe", "add_lora", "save_lora", "read_lora_file",
           "merge_lora_file", "write_merged", "finetune"]
