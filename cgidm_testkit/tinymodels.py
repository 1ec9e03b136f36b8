"""Tiny random diffusion models built on the fly for tests.

Real checkpoints are gigabytes and may not be downloaded here, so tests build miniature models
with the same classes and folder layouts as the real ones (diffusers pipelines, DreamBooth
folders, LoRA files, single-file LDM checkpoints). Everything is seeded, so the same call always
writes the same weights, and everything is saved as safetensors, because that is all the loader
accepts. A "fine-tune" is the base with seeded noise added to its weights: enough to make the two
models disagree, which is all the loading tests and the plumbing of the method need.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

# A shared prefix keeps the special-token ids where the tiny text encoder config expects them.
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


# --------------------------------------------------------------------------------------------
# helpers


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Add seeded Gaussian noise to every parameter, in place, relative to its spread.

    Noise proportional to each tensor's standard deviation changes every layer by about the same
    relative amount; tensors with no spread (fresh norm weights, zero biases) get absolute noise.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            spread = float(param.float().std()) if param.numel() > 1 else 0.0
            spread = max(spread, 0.02)
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_((noise * scale * spread).to(param.dtype))
    return module


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-to-printable-character table of GPT-2/CLIP byte-level BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_tiny_clip_tokenizer(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write a working CLIP tokenizer (vocab.json + merges.txt) with a byte-level vocabulary.

    Every byte is a token (plus its end-of-word form), and a few merges make common letter pairs
    single tokens, so any prompt tokenizes without unknown tokens.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = ["s k", "sk s</w>", "s t", "st y", "sty l", "styl e</w>", "d o", "do g</w>"]
    for merge in merges:
        tokens.append(merge.replace(" ", ""))
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    config = {
        "model_max_length": model_max_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _load_tiny_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


# --------------------------------------------------------------------------------------------
# pixel-space DDPM


def tiny_tokenizer_and_text_config():
    """A tiny CLIP tokenizer (files written to a temp dir, loaded, removed) and a text config
    that fits it; SD and SDXL test pipelines share both."""
    from transformers import CLIPTextConfig

    tokenizer_dir = Path(tempfile.mkdtemp(prefix="cgidm-tok-"))
    try:
        tokenizer = _load_tiny_tokenizer(write_tiny_clip_tokenizer(tokenizer_dir))
    finally:
        shutil.rmtree(tokenizer_dir, ignore_errors=True)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, config


def tiny_ddpm_unet(seed: int = 0, sample_size: int = 16):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


def make_tiny_ddpm(path: str | Path, seed: int = 0, sample_size: int = 16) -> Path:
    """Save a random pixel-space ``DDPMPipeline`` (tiny UNet2DModel + 1000-step DDPM schedule)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    path = Path(path)
    unet = tiny_ddpm_unet(seed, sample_size)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_ddpm_pair(
    root: str | Path, seed: int = 0, sample_size: int = 16
) -> tuple[Path, Path]:
    """A DDPM base and a fine-tune of it (same weights plus seeded noise), in ``root``."""
    from diffusers import DDPMPipeline

    root = Path(root)
    pre_dir = make_tiny_ddpm(root / "ddpm_pretrained", seed=seed, sample_size=sample_size)
    pipe = DDPMPipeline.from_pretrained(pre_dir, use_safetensors=True, local_files_only=True)
    perturb_(pipe.unet, seed=seed + 1000)
    ft_dir = root / "ddpm_finetuned"
    pipe.save_pretrained(ft_dir, safe_serialization=True)
    return pre_dir, ft_dir


def make_tiny_pixel_flow_pair(
    root: str | Path, seed: int = 0, sample_size: int = 16, shift: float = 1.0
) -> tuple[Path, Path]:
    """A pixel flow-matching base and a fine-tune of it: the tiny DDPM UNet saved with a
    ``FlowMatchEulerDiscreteScheduler``, which is what marks a folder as flow matching."""
    from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler

    root = Path(root)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    unet = tiny_ddpm_unet(seed, sample_size)
    pre_dir = root / "flow_pretrained"
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(pre_dir, safe_serialization=True)
    perturb_(unet, seed=seed + 1000)
    ft_dir = root / "flow_finetuned"
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(ft_dir, safe_serialization=True)
    return pre_dir, ft_dir


# --------------------------------------------------------------------------------------------
# Stable Diffusion 1.x layout


def tiny_sd_components(seed: int = 0, sample_size: int = 8, prediction_type: str = "epsilon"):
    """The components of a tiny SD pipeline (not saved); the tokenizer lives in a temp folder."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        sample_size=sample_size * 2,
        scaling_factor=0.18215,
    )
    tokenizer, text_config = tiny_tokenizer_and_text_config()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config)
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def make_tiny_sd(
    path: str | Path, seed: int = 0, sample_size: int = 8, prediction_type: str = "epsilon"
) -> Path:
    """Save a random ``StableDiffusionPipeline`` folder.

    The VAE has two blocks, so one latent cell covers 2x2 pixels (``2 ** (len(blocks) - 1)``):
    latents are ``(4, sample_size, sample_size)`` and images ``2 * sample_size`` pixels wide.
    Tests that assume Stable Diffusion's factor of 8 instead of reading it from the pair fail here.
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    pipe = StableDiffusionPipeline(
        **tiny_sd_components(seed, sample_size, prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _load_component(base: Path, subfolder: str):
    """One network of a tiny SD or SDXL pipeline folder, by its subfolder name."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    classes = {
        "unet": UNet2DConditionModel,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }
    return classes[subfolder].from_pretrained(
        base, subfolder=subfolder, use_safetensors=True, local_files_only=True
    )


def make_dreambooth_folder(
    base: str | Path, out: str | Path, text_encoders: tuple[str, ...] = ("text_encoder",),
    seed: int = 1,
) -> Path:
    """What DreamBooth training leaves (SD or SDXL): ``unet/`` plus the named text encoder
    folders, each perturbed, without model_index.json."""
    base, out = Path(base), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    perturb_(_load_component(base, "unet"), seed=seed).save_pretrained(
        out / "unet", safe_serialization=True
    )
    for offset, name in enumerate(text_encoders, start=1):
        encoder = perturb_(_load_component(base, name), seed=seed + offset)
        encoder.save_pretrained(out / name, safe_serialization=True)
    return out


def make_full_finetune(base: str | Path, out: str | Path, seed: int = 1) -> Path:
    """A complete SD or SDXL pipeline folder: a copy of ``base`` whose UNet is perturbed."""
    base, out = Path(base), Path(out)
    shutil.copytree(base, out, dirs_exist_ok=True)
    unet = perturb_(_load_component(base, "unet"), seed=seed)
    shutil.rmtree(out / "unet")
    unet.save_pretrained(out / "unet", safe_serialization=True)
    return out


def randomize_lora_b(module: torch.nn.Module, generator: torch.Generator,
                     scale: float = 0.2) -> None:
    """Seeded random ``lora_B`` matrices: peft starts them at zero, an adapter that changes
    nothing (every merge or swap test would pass trivially)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def make_lora(
    base: str | Path,
    out: str | Path,
    as_file: bool = False,
    seed: int = 1,
    rank: int = 4,
    with_text_encoder: bool = False,
) -> Path:
    """Write a LoRA adapter for the base UNet (and text encoder) with ``save_lora_weights``.

    peft initialises ``lora_B`` to zero (an adapter that changes nothing), so the B matrices get
    seeded random values. ``out`` is a folder holding ``pytorch_lora_weights.safetensors``; with
    ``as_file`` the file's path is returned instead of the folder. Text-encoder keys are written
    with the ``text_model.`` level that real (transformers 4) LoRA files carry.
    """
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    base, out = Path(base), Path(out)
    unet = _load_component(base, "unet")
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights=True,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    generator = torch.Generator().manual_seed(seed)
    randomize_lora_b(unet, generator)
    text_encoder_layers = None
    if with_text_encoder:
        # peft directly: transformers' own add_adapter may demand a newer peft than diffusers
        text_encoder = _load_component(base, "text_encoder")
        inject_adapter_in_model(
            LoraConfig(
                r=rank,
                lora_alpha=rank,
                init_lora_weights=True,
                target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
            ),
            text_encoder,
        )
        randomize_lora_b(text_encoder, generator)
        text_encoder_layers = {
            (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in get_peft_model_state_dict(text_encoder).items()
        }
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=text_encoder_layers,
        safe_serialization=True,
    )
    weights = out / "pytorch_lora_weights.safetensors"
    return weights if as_file else out


# --------------------------------------------------------------------------------------------
# single-file checkpoints in the original (CompVis LDM) key layout
#
# diffusers only ships the LDM -> diffusers direction (``diffusers.loaders.single_file_utils``:
# ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``);
# the reverse lives in its repository script ``convert_diffusers_to_original_stable_diffusion.py``,
# which hard-codes SD 1.x's four blocks of two layers. The functions below are that reverse written
# for any block count and layers per block, derived from the forward functions' index arithmetic;
# ``tests/test_models.py`` checks that diffusers' own ``from_single_file`` reads them back exactly.

_UNET_RESNET_TO_LDM = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_UNET_TOP_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's added (text + time) embedding
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def _rename_resnet(rest: str) -> str:
    for new, old in _UNET_RESNET_TO_LDM:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def unet_state_dict_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet state dict to the LDM layout (``model.diffusion_model.*``)."""
    per_block = int(config["layers_per_block"])
    up_has_attention = ["CrossAttn" in name for name in config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        module, leaf = key.rsplit(".", 1)
        if module in _UNET_TOP_TO_LDM:
            new = f"{_UNET_TOP_TO_LDM[module]}.{leaf}"
        elif parts[0] == "down_blocks":
            block, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "downsamplers":
                index = 1 + block * (per_block + 1) + per_block
                new = f"input_blocks.{index}.0.op." + ".".join(parts[5:])
            else:
                index = 1 + block * (per_block + 1) + int(parts[3])
                if kind == "resnets":
                    new = f"input_blocks.{index}.0.{_rename_resnet(rest)}"
                else:
                    new = f"input_blocks.{index}.1.{rest}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{2 * index}.{_rename_resnet(rest)}"
            else:
                new = f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            block, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "upsamplers":
                index = block * (per_block + 1) + per_block
                slot = 2 if up_has_attention[block] else 1
                new = f"output_blocks.{index}.{slot}.conv." + ".".join(parts[5:])
            else:
                index = block * (per_block + 1) + int(parts[3])
                if kind == "resnets":
                    new = f"output_blocks.{index}.0.{_rename_resnet(rest)}"
                else:
                    new = f"output_blocks.{index}.1.{rest}"
        else:
            raise ValueError(f"no LDM name for UNet key {key!r}")
        out["model.diffusion_model." + new] = value
    return out


def vae_state_dict_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to ``first_stage_model.*`` keys."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    num_up = len(config["up_block_types"])
    attention_names = {
        "group_norm": "norm",
        "to_q": "q",
        "to_k": "k",
        "to_v": "v",
        "to_out.0": "proj_out",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in top:
            out["first_stage_model." + top[key]] = value
            continue
        parts = key.split(".")
        coder = parts[0]
        if parts[1] in ("down_blocks", "up_blocks"):
            block = int(parts[2])
            ldm_block = block if parts[1] == "down_blocks" else num_up - 1 - block
            stage = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{coder}.{stage}.{ldm_block}.block.{parts[4]}.{rest}"
            else:
                sampler = "downsample" if stage == "down" else "upsample"
                new = f"{coder}.{stage}.{ldm_block}.{sampler}." + ".".join(parts[5:])
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{coder}.mid.block_{int(parts[3]) + 1}.{rest}"
            else:
                rest = ".".join(parts[4:])
                for diffusers_name, ldm_name in attention_names.items():
                    if rest.startswith(diffusers_name + "."):
                        rest = ldm_name + rest[len(diffusers_name) :]
                        break
                new = f"{coder}.mid.attn_1.{rest}"
                if value.ndim == 2:  # LDM stores these projections as 1x1 convolutions
                    value = value[:, :, None, None]
        else:
            raise ValueError(f"no LDM name for VAE key {key!r}")
        out["first_stage_model." + new] = value
    return out


def pipeline_to_single_file(pipeline_dir: str | Path, out_file: str | Path) -> Path:
    """Write a diffusers SD pipeline folder as one LDM-layout ``.safetensors`` checkpoint."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    pipeline_dir, out_file = Path(pipeline_dir), Path(out_file)
    pipe = StableDiffusionPipeline.from_pretrained(
        pipeline_dir, use_safetensors=True, local_files_only=True, safety_checker=None
    )
    tensors: dict[str, torch.Tensor] = {}
    tensors.update(unet_state_dict_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    tensors.update(vae_state_dict_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers 5 dropped the ``text_model.`` level that real checkpoints carry
        key = key if key.startswith("text_model.") else "text_model." + key
        tensors["cond_stage_model.transformer." + key] = value
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_file))
    return out_file


def make_single_file(
    base: str | Path, out_file: str | Path, seed: int = 1, source: str | Path | None = None
) -> Path:
    """A single-file LDM checkpoint of a fine-tune of ``base``.

    Converts ``source`` (a pipeline folder) if given; otherwise first writes a full fine-tune of
    ``base`` (perturbed UNet, same text encoder) next to ``out_file`` as ``<stem>_diffusers/``,
    which tests can load as the reference the single file must reproduce.
    """
    out_file = Path(out_file)
    if source is None:
        source = make_full_finetune(base, out_file.parent / f"{out_file.stem}_diffusers", seed)
    return pipeline_to_single_file(source, out_file)


# --------------------------------------------------------------------------------------------
# SDXL (base 1.0 layout: two text encoders, the second with projection, ``text_time`` embedding)


def make_tiny_sdxl(
    path: str | Path, seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 8,
    text_encoder_2_layers: int = 2,
) -> Path:
    """Save a random ``StableDiffusionXLPipeline`` folder.

    The UNet's first block has no attention, as SDXL's; the text encoders (hidden 32 and 48) give
    80-dim cross-attention features, and the added embedding takes 6 time ids x 8 + the second
    encoder's 32-dim projection. Latents are ``(4, sample_size, sample_size)``, images twice that.
    diffusers recognises an SDXL base single file by its second encoder's 10th layer: a base to
    be written as one file needs ``text_encoder_2_layers >= 10``.
    """
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + text_encoder_2 pooled 32
        cross_attention_dim=80,  # hidden sizes 32 + 48 of the two text encoders
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        sample_size=sample_size * 2,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    tokenizer, text_config = tiny_tokenizer_and_text_config()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config).eval()
    torch.manual_seed(seed + 3)
    # A wider second encoder, as SDXL's (1280 vs 768): diffusers tells the two apart by width
    # when it converts a single-file checkpoint.
    text_config_2 = text_config.__class__(**{**text_config.to_dict(), "hidden_size": 48,
                                             "intermediate_size": 64,
                                             "num_hidden_layers": text_encoder_2_layers})
    text_encoder_2 = CLIPTextModelWithProjection(text_config_2).eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type=prediction_type,
        ),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _sdxl_lora_layers(base: Path, seed: int, rank: int) -> dict[str, dict[str, torch.Tensor]]:
    """peft LoRA state dicts (random ``lora_B``) for the UNet and both text encoders."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)  # peft draws lora_A from the global generator
    generator = torch.Generator().manual_seed(seed)
    unet = _load_component(base, "unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    randomize_lora_b(unet, generator)
    layers = {"unet": get_peft_model_state_dict(unet)}
    for name in ("text_encoder", "text_encoder_2"):
        encoder = _load_component(base, name)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                           target_modules=["q_proj", "k_proj", "v_proj",
                                                           "out_proj"]), encoder)
        randomize_lora_b(encoder, generator)
        layers[name] = {
            (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in get_peft_model_state_dict(encoder).items()
        }
    return layers


def make_sdxl_lora(base: str | Path, out: str | Path, seed: int = 1, rank: int = 4) -> Path:
    """A diffusers-format SDXL LoRA folder (UNet + both text encoders)."""
    from diffusers import StableDiffusionXLPipeline

    out = Path(out)
    layers = _sdxl_lora_layers(Path(base), seed, rank)
    StableDiffusionXLPipeline.save_lora_weights(
        out,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
        safe_serialization=True,
    )
    return out


def make_sdxl_kohya_lora(
    base: str | Path, out_file: str | Path, seed: int = 1, rank: int = 4, alpha: float = 2.0,
    metadata: dict[str, str] | None = None,
) -> Path:
    """The same kind of LoRA in kohya-ss / Civitai naming, as sd-scripts writes SDXL LoRAs.

    UNet modules get their original (SGM) names (``lora_unet_input_blocks_4_1_transformer_...``),
    text encoders the ``lora_te1_`` / ``lora_te2_`` prefixes; each module has ``lora_down``,
    ``lora_up`` and an ``alpha`` (scale alpha / rank). ``metadata`` goes into the safetensors
    header, as kohya's ``ss_*`` training metadata does.
    """
    from safetensors.torch import save_file

    base, out_file = Path(base), Path(out_file)
    layers = _sdxl_lora_layers(base, seed, rank)
    unet_config = json.loads((base / "unet" / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}

    def add(prefix: str, module: str, state: dict[str, torch.Tensor]) -> None:
        name = prefix + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = state[f"{module}.lora_A.weight"]
        # diffusers scales by alpha / rank; peft's state already holds the plain B matrix
        tensors[f"{name}.lora_up.weight"] = state[f"{module}.lora_B.weight"] * (rank / alpha)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)

    unet_state = layers["unet"]
    for module in sorted({k.rsplit(".lora_", 1)[0] for k in unet_state}):
        ldm = next(iter(unet_state_dict_to_ldm({module + ".weight": torch.zeros(1)},
                                               unet_config)))
        sgm = ldm[len("model.diffusion_model."):-len(".weight")]
        add("lora_unet_", sgm, {k.replace(module, sgm): v for k, v in unet_state.items()
                                if k.startswith(module + ".")})
    for prefix, name in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        state = layers[name]
        for module in sorted({k.rsplit(".lora_", 1)[0] for k in state}):
            add(prefix, module, state)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_file),
              metadata=metadata or {})
    return out_file


def open_clip_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` state dict in OpenCLIP naming, as SDXL checkpoints store
    their second text encoder (the reverse of diffusers' ``convert_open_clip_checkpoint``): the
    q/k/v projections concatenated into ``in_proj``, the text projection transposed."""
    top = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    renames = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
               ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
    state = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
             for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {"text_projection": state["text_projection.weight"].T}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key.startswith("text_model.encoder.layers."):
            rest = key[len("text_model.encoder.layers."):]
            index, name = rest.split(".", 1)
            if name.startswith("self_attn.q_proj."):
                leaf = name.rsplit(".", 1)[1]
                qkv = [state[f"text_model.encoder.layers.{index}.self_attn.{p}_proj.{leaf}"]
                       for p in "qkv"]
                out[f"transformer.resblocks.{index}.attn.in_proj_{leaf}"] = torch.cat(qkv)
            elif name.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                continue
            else:
                for new, old in renames:
                    name = name.replace(new, old)
                out[f"transformer.resblocks.{index}.{name}"] = value
    return out


def sdxl_pipeline_to_single_file(folder: str | Path, out_file: str | Path) -> Path:
    """A complete SDXL pipeline folder (UNet, VAE, both text encoders) as one SGM-layout file."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    folder, out_file = Path(folder), Path(out_file)
    unet = _load_component(folder, "unet")
    tensors = unet_state_dict_to_ldm(unet.state_dict(), unet.config)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    tensors.update(vae_state_dict_to_ldm(vae.state_dict(), vae.config))
    tensors.update(_sgm_text_encoder_tensors(folder))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_file))
    return out_file


def _sgm_text_encoder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """A pipeline folder's two text encoders in the original (SGM) checkpoint's naming: CLIP as
    ``conditioner.embedders.0.transformer.*``, OpenCLIP as ``conditioner.embedders.1.model.*``."""
    tensors = {}
    for key, value in _load_component(folder, "text_encoder").state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        if not key.endswith("position_ids"):
            tensors["conditioner.embedders.0.transformer." + key] = value
    second = _load_component(folder, "text_encoder_2").state_dict()
    for key, value in open_clip_state_dict(second).items():
        tensors["conditioner.embedders.1.model." + key] = value
    return tensors


def make_sdxl_single_file(base: str | Path, out_file: str | Path, seed: int = 1,
                          text_encoders: bool = True) -> Path:
    """An original-layout (SGM) SDXL checkpoint of a fine-tune of ``base``: the perturbed UNet as
    ``model.diffusion_model.*`` and, with ``text_encoders``, both (perturbed) text encoders as
    ``conditioner.embedders.0.transformer.*`` (CLIP) and ``conditioner.embedders.1.model.*``
    (OpenCLIP). The fine-tune is also written as a pipeline folder ``<stem>_diffusers/`` (the
    UNet, and the text encoders when included) for tests to compare with.
    """
    from safetensors.torch import save_file

    base, out_file = Path(base), Path(out_file)
    source = make_full_finetune(base, out_file.parent / f"{out_file.stem}_diffusers", seed)
    unet = _load_component(source, "unet")
    tensors = unet_state_dict_to_ldm(unet.state_dict(), unet.config)
    if text_encoders:
        for offset, name in enumerate(("text_encoder", "text_encoder_2"), start=1):
            encoder = perturb_(_load_component(base, name), seed=seed + offset)
            shutil.rmtree(source / name)
            encoder.save_pretrained(source / name, safe_serialization=True)
        tensors.update(_sgm_text_encoder_tensors(source))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_file))
    return out_file


# --------------------------------------------------------------------------------------------
# Flux.1 (dev with a guidance embedding, schnell without): a FluxTransformer2DModel over packed
# 2x2 patches of a 16-channel latent, CLIP (pooled) + T5 (sequence) text encoders


def write_tiny_t5_tokenizer(folder: str | Path, model_max_length: int = 512) -> Path:
    """A working T5-style tokenizer (``tokenizer.json``) built with the ``tokenizers`` library:
    a Unigram model over single characters with SentencePiece's ``▁`` word marker, ``</s>``
    appended, ``<pad>`` = 0 as T5's; so no sentencepiece model file is needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "</s>", "<unk>"]
    pieces = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789,.'-")
    pieces += ["▁sks", "▁style", "▁dog", "▁a", "▁painting"]
    vocab = [(token, 0.0) for token in specials] + [(p, -float(len(pieces) - i) / 10)
                                                    for i, p in enumerate(pieces)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁")
    tokenizer.decoder = decoders.Metaspace(replacement="▁")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": model_max_length,
              "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
              "extra_ids": 0}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def tiny_t5_tokenizer_and_encoder(seed: int):
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    folder = Path(tempfile.mkdtemp(prefix="cgidm-t5tok-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(write_tiny_t5_tokenizer(folder)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    torch.manual_seed(seed)
    return tokenizer, T5EncoderModel(config).eval()


def tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = True):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x a 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # the tiny T5's width
        pooled_projection_dim=32,  # the tiny CLIP's width
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )


def make_tiny_flux(path: str | Path, seed: int = 0, variant: str = "dev",
                   sample_size: int = 32) -> Path:
    """Save a random ``FluxPipeline`` folder: ``variant`` "dev" (guidance embedding, dynamic
    time shift as FLUX.1-dev's scheduler config) or "schnell" (neither). The VAE has two blocks,
    so a latent pixel is 2x2 image pixels and a packed token 4x4: images are ``sample_size``
    (the VAE config's, the native size) and latents ``16 x sample_size/2``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    path = Path(path)
    dev = variant == "dev"
    transformer = tiny_flux_transformer(seed, guidance_embeds=dev)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        sample_size=sample_size,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    tokenizer, text_config = tiny_tokenizer_and_text_config()
    from transformers import CLIPTextModel

    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config).eval()
    tokenizer_2, text_encoder_2 = tiny_t5_tokenizer_and_encoder(seed + 3)
    scheduler = (
        FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                        max_shift=1.15, base_image_seq_len=256,
                                        max_image_seq_len=4096)
        if dev else FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    )
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                 text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                 transformer=transformer).save_pretrained(path, safe_serialization=True)
    return path


def load_flux_transformer(folder: str | Path, subfolder: str | None = "transformer"):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(folder, subfolder=subfolder,
                                                  use_safetensors=True, local_files_only=True)


def make_flux_transformer_folder(base: str | Path, out: str | Path, seed: int = 1) -> Path:
    """What diffusers' Flux DreamBooth script leaves: ``transformer/`` only, perturbed."""
    out = Path(out)
    perturb_(load_flux_transformer(base), seed=seed).save_pretrained(
        out / "transformer", safe_serialization=True)
    return out


def make_flux_full_finetune(base: str | Path, out: str | Path, seed: int = 1,
                            t5_seed: int | None = None) -> Path:
    """A complete Flux pipeline folder: a copy of ``base`` whose transformer is perturbed (and
    its T5, ``text_encoder_2/``, too when ``t5_seed`` is given)."""
    from transformers import T5EncoderModel

    base, out = Path(base), Path(out)
    shutil.copytree(base, out, dirs_exist_ok=True)
    transformer = perturb_(load_flux_transformer(base), seed=seed)
    shutil.rmtree(out / "transformer")
    transformer.save_pretrained(out / "transformer", safe_serialization=True)
    if t5_seed is not None:
        t5 = perturb_(T5EncoderModel.from_pretrained(base / "text_encoder_2"), seed=t5_seed)
        shutil.rmtree(out / "text_encoder_2")
        t5.save_pretrained(out / "text_encoder_2", safe_serialization=True)
    return out


def make_flux_single_file(base: str | Path, out_file: str | Path, seed: int = 1) -> Path:
    """A fine-tuned transformer as one ``.safetensors`` file in diffusers naming; the same
    transformer is also written as ``<stem>_diffusers/transformer`` for tests to compare with.

    (diffusers' converter for Black Forest Labs' naming hard-codes FLUX.1's width of 3072, so a
    tiny transformer can only be written in diffusers naming.)"""
    from safetensors.torch import save_file

    out_file = Path(out_file)
    folder = make_flux_transformer_folder(base, out_file.parent / f"{out_file.stem}_diffusers",
                                          seed)
    state = load_flux_transformer(folder).state_dict()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_file))
    return out_file


def make_flux_lora(base: str | Path, out: str | Path, seed: int = 1, rank: int = 4) -> Path:
    """A diffusers/peft-format Flux LoRA folder (attention projections of every block)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = load_flux_transformer(base)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    randomize_lora_b(transformer, torch.Generator().manual_seed(seed))
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(
        transformer), safe_serialization=True)
    return Path(out)


def _lora_pair(generator: torch.Generator, rank: int, fan_in: int, fan_out: int):
    down = torch.randn((rank, fan_in), generator=generator) * 0.2
    up = torch.randn((fan_out, rank), generator=generator) * 0.2
    return down, up


def make_flux_kohya_lora(base: str | Path, out_file: str | Path, seed: int = 1, rank: int = 4,
                         alpha: float = 2.0, metadata: dict[str, str] | None = None,
                         with_clip: bool = True) -> Path:
    """A Flux LoRA in kohya-ss naming, as sd-scripts' ``flux_train_network.py`` writes it:
    Black Forest Labs' module names (``lora_unet_double_blocks_0_img_attn_qkv`` with q, k and v
    fused, ``..._txt_attn_proj``, ``lora_unet_single_blocks_0_linear2``), ``lora_down`` /
    ``lora_up`` / ``alpha`` per module, and with ``with_clip`` ``lora_te1_*`` CLIP layers.
    ``metadata`` goes into the header as kohya's ``ss_*`` training metadata does."""
    from safetensors.torch import save_file

    config = json.loads((Path(base) / "transformer" / "config.json").read_text())
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def add(name: str, fan_in: int, fan_out: int) -> None:
        down, up = _lora_pair(generator, rank, fan_in, fan_out)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)

    for i in range(config["num_layers"]):
        for stream in ("img", "txt"):
            add(f"lora_unet_double_blocks_{i}_{stream}_attn_qkv", dim, 3 * dim)
            add(f"lora_unet_double_blocks_{i}_{stream}_attn_proj", dim, dim)
    for i in range(config["num_single_layers"]):
        add(f"lora_unet_single_blocks_{i}_linear2", dim * 5, dim)  # attention + 4x MLP in
    if with_clip:
        clip = json.loads((Path(base) / "text_encoder" / "config.json").read_text())
        width = clip["hidden_size"]
        for layer in range(clip["num_hidden_layers"]):
            for proj in ("q_proj", "v_proj"):
                add(f"lora_te1_text_model_encoder_layers_{layer}_self_attn_{proj}", width, width)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file), metadata=metadata or {})
    return out_file


def make_flux_xlabs_lora(base: str | Path, out_file: str | Path, seed: int = 1,
                         rank: int = 4) -> Path:
    """A Flux LoRA in XLabs-AI's naming (``double_blocks.N.processor.qkv_lora1.down.weight``,
    ``proj_lora1`` for the image stream, ``..._lora2`` for the text stream; no alphas)."""
    from safetensors.torch import save_file

    config = json.loads((Path(base) / "transformer" / "config.json").read_text())
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(config["num_layers"]):
        for stream in ("1", "2"):
            for kind, fan_out in (("qkv", 3 * dim), ("proj", dim)):
                down, up = _lora_pair(generator, rank, dim, fan_out)
                prefix = f"double_blocks.{i}.processor.{kind}_lora{stream}"
                tensors[f"{prefix}.down.weight"] = down
                tensors[f"{prefix}.up.weight"] = up
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file))
    return out_file
