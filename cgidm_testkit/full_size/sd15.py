"""The Stable Diffusion 1.5 architecture, built with random weights and no download.

The configs are those of ``runwayml/stable-diffusion-v1-5`` (``unet/``, ``vae/``,
``text_encoder/`` and the ``safety_checker/`` of the same repository), written out so that the
memory and GPU benchmarks measure the real network sizes on a machine that may not fetch weights.
Weight VALUES do not matter for memory or speed, only shapes and dtypes do.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

#: The safety checker's vision tower (CLIP ViT-L/14), which ``from_pretrained`` loads into the
#: authors' second pipeline (they pass ``safety_checker=None`` only for the fine-tuned one).
SAFETY_CHECKER_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}

def seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _cast(module, dtype: torch.dtype):
    # Casting only when needed: diffusers warns about any .to(dtype) on a model.
    return module if next(module.parameters()).dtype == dtype else module.to(dtype=dtype)


def build_unet(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from diffusers import UNet2DConditionModel

    seeded(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIG)
    return _cast(unet, dtype)


def build_vae(seed: int = 1, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from diffusers import AutoencoderKL

    seeded(seed)
    with torch.device(device):
        vae = AutoencoderKL(**VAE_CONFIG)
    return _cast(vae, dtype)


def build_tokenizer():
    """A working CLIP tokenizer with a byte-level vocabulary (the real vocab cannot be fetched).

    The real one holds 49408 tokens and 48894 merges in Python dicts (tens of MB); the reference
    layout holds two of them and cgidm one, so using a small one favours the reference slightly.
    """
    from transformers import CLIPTokenizer

    from cgidm_testkit.tinymodels import write_tiny_clip_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="cgidm-sd15-tok-"))
    try:
        return CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(folder)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def build_text_encoder(tokenizer, seed: int = 2, dtype: torch.dtype = torch.float32,
                       device: str = "cpu"):
    from transformers import CLIPTextConfig, CLIPTextModel

    seeded(seed)
    config = CLIPTextConfig(
        **TEXT_ENCODER_CONFIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device(device):
        encoder = CLIPTextModel(config)
    return _cast(encoder, dtype).eval()


def build_safety_checker(seed: int = 3, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    seeded(seed)
    config = CLIPConfig(
        text_config=dict(TEXT_ENCODER_CONFIG),
        vision_config=dict(SAFETY_CHECKER_VISION_CONFIG),
        projection_dim=768,
    )
    with torch.device(device):
        checker = StableDiffusionSafetyChecker(config)
    return _cast(checker, dtype).eval()


def build_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(**SCHEDULER_CONFIG)


def add_lora(unet, rank: int, seed: int = 4) -> int:
    """Attach a LoRA adapter of ``rank`` to the UNet's attention projections, as the diffusers
    DreamBooth-LoRA script does; returns the adapter's parameter count."""
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        ),
        adapter_name="cgidm_finetuned",
    )
    seeded(seed)
    count = 0
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.01)
                count += param.numel()
    return count
