"""The SDXL base 1.0 architecture, built with random weights (or on the meta device), no download.

The configs are those of ``stabilityai/stable-diffusion-xl-base-1.0`` (``unet/``, ``vae/``,
``text_encoder/`` = CLIP ViT-L/14, ``text_encoder_2/`` = OpenCLIP ViT-bigG/14 with projection),
written out so the memory and GPU benchmarks measure the real network sizes on machines that
may not fetch weights. :data:`EXPECTED_PARAMETERS` holds the released networks' parameter
counts; ``tests/test_family_memory.py`` checks the configs against them on the meta device.

``scale`` < 1 shrinks every width and depth for the CPU smoke paths of ``benchmarks/gpu.py``
and ``benchmarks/cuda_check.py`` (``--dry-run``), which must not rot while no GPU is lent.
"""

from __future__ import annotations

from typing import Any

import torch

from cgidm_testkit.full_size import sd15

UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

VAE_CONFIG: dict[str, Any] = {
    **sd15.VAE_CONFIG,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

TEXT_ENCODER_CONFIG: dict[str, Any] = dict(sd15.TEXT_ENCODER_CONFIG)

TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

#: Parameter counts of the released SDXL base 1.0 networks.
EXPECTED_PARAMETERS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


def unet_config(scale: float = 1.0) -> dict[str, Any]:
    """The UNet config, every width and depth shrunk for ``scale`` < 1 (smoke tests only)."""
    if scale >= 1.0:
        return dict(UNET_CONFIG)
    return {
        **UNET_CONFIG,
        "block_out_channels": [32, 64, 64],
        "attention_head_dim": [2, 4, 4],
        "addition_embed_type_num_heads": 8,
        "addition_time_embed_dim": 8,
        "cross_attention_dim": 32 + 32,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,
        "transformer_layers_per_block": [1, 1, 1],
        "layers_per_block": 1,
        "norm_num_groups": 16,
        "sample_size": 16,
    }


def build_unet(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
               scale: float = 1.0):
    from diffusers import UNet2DConditionModel

    sd15.seeded(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(scale))
    return unet.to(dtype=dtype) if next(unet.parameters()).dtype != dtype else unet


def build_vae(seed: int = 1, dtype: torch.dtype = torch.float32, device: str = "cpu",
              scale: float = 1.0):
    from diffusers import AutoencoderKL

    sd15.seeded(seed)
    config = dict(VAE_CONFIG)
    if scale < 1.0:
        config.update(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                      up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1,
                      norm_num_groups=8, sample_size=32)
    with torch.device(device):
        vae = AutoencoderKL(**config)
    return vae.to(dtype=dtype) if next(vae.parameters()).dtype != dtype else vae


def build_text_encoders(tokenizer, seed: int = 2, dtype: torch.dtype = torch.float32,
                        device: str = "cpu", scale: float = 1.0):
    """``(CLIPTextModel, CLIPTextModelWithProjection)`` as SDXL's two text encoders."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    first, second = dict(TEXT_ENCODER_CONFIG), dict(TEXT_ENCODER_2_CONFIG)
    if scale < 1.0:
        small = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                 "num_hidden_layers": 2, "projection_dim": 32,
                 "vocab_size": len(tokenizer)}
        first.update(small)
        second.update(small)
    sd15.seeded(seed)
    with torch.device(device):
        te1 = CLIPTextModel(CLIPTextConfig(**first, **ids))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**second, **ids))
    return te1.to(dtype=dtype).eval(), te2.to(dtype=dtype).eval()


def add_lora(unet, rank: int, seed: int = 4) -> int:
    """A rank-``rank`` adapter on the attention projections (the diffusers SDXL LoRA script's
    targets); returns its parameter count."""
    return sd15.add_lora(unet, rank, seed=seed)
