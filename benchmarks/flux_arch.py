"""The Flux.1 architecture (dev and schnell), built on the meta device or with random weights.

The configs are diffusers' for ``black-forest-labs/FLUX.1-dev`` / ``FLUX.1-schnell``:
``FluxTransformer2DModel`` (19 double-stream and 38 single-stream blocks, 24 heads of 128,
joint_attention_dim 4096 from T5, pooled projection 768 from CLIP-L, 64 input channels = the
16-channel VAE latent packed in 2x2 patches; ``guidance_embeds`` True for dev, False for
schnell), ``T5EncoderModel`` (T5 v1.1 XXL encoder), ``CLIPTextModel`` (ViT-L/14) and the
16-channel ``AutoencoderKL``. Nothing is downloaded. At full size the transformer alone is 12 B
parameters (24 GB in bfloat16), so the memory benchmark counts it on the meta device
(``torch.device("meta")``: shapes and dtypes, no storage); ``scale`` < 1 builds a small one
with real random weights for the CPU smoke paths.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import sd15  # noqa: E402

TRANSFORMER_CONFIG: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

T5_CONFIG: dict[str, Any] = {
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "dense_act_fn": "gelu_new",
    "feed_forward_proj": "gated-gelu",
    "is_gated_act": True,
    "num_heads": 64,
    "num_layers": 24,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "vocab_size": 32128,
}

VAE_CONFIG: dict[str, Any] = {
    **sd15.VAE_CONFIG,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

#: Parameter counts of the released networks (dev; schnell's transformer has no guidance
#: embedder: 11,891,178,560, 10.2 M fewer).
EXPECTED_PARAMETERS = {
    "transformer": 11_901_408_320,
    "text_encoder_2": 4_762_310_656,
    "text_encoder": 123_060_480,
    "vae": 83_819_683,
}

#: Native size: 1024 px -> a 16x128x128 latent -> 64x64 = 4096 packed tokens; T5 prompt length.
NATIVE_SIDE = 1024
T5_TOKENS = 512
CLIP_TOKENS = 77


def transformer_config(variant: str = "dev", scale: float = 1.0) -> dict[str, Any]:
    if variant not in ("dev", "schnell"):
        raise ValueError(f"unknown Flux variant {variant!r}; use dev or schnell")
    config = {**TRANSFORMER_CONFIG, "guidance_embeds": variant == "dev"}
    if scale < 1.0:
        config.update(attention_head_dim=16, axes_dims_rope=[4, 6, 6], num_attention_heads=2,
                      num_layers=1, num_single_layers=2, joint_attention_dim=32,
                      pooled_projection_dim=32)
    return config


def build_transformer(variant: str = "dev", seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                      device: str = "meta", scale: float = 1.0):
    from diffusers import FluxTransformer2DModel

    sd15.seeded(seed)
    # Built in ``dtype`` directly: at full size a float32 copy on the way would be 48 GB.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**transformer_config(variant, scale))
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype=dtype)


def build_t5(dtype: torch.dtype = torch.bfloat16, device: str = "meta"):
    from transformers import T5Config, T5EncoderModel

    with torch.device(device):
        return T5EncoderModel(T5Config(**T5_CONFIG)).to(dtype=dtype).eval()


def build_clip(dtype: torch.dtype = torch.bfloat16, device: str = "meta"):
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        return CLIPTextModel(CLIPTextConfig(**sd15.TEXT_ENCODER_CONFIG)).to(dtype=dtype).eval()


def build_vae(dtype: torch.dtype = torch.float32, device: str = "meta"):
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**VAE_CONFIG).to(dtype=dtype)


def add_lora(transformer, rank: int) -> int:
    """A rank-``rank`` adapter on the attention projections of every block (what diffusers'
    Flux DreamBooth-LoRA script targets by default); returns its parameter count."""
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0"]), adapter_name="cgidm_finetuned")
    return sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n)


def packed_inputs(batch: int, side: int, dtype: torch.dtype, device: str | torch.device,
                  variant: str = "dev", scale: float = 1.0,
                  text_tokens: int = T5_TOKENS) -> dict[str, Any]:
    """Inputs of one transformer call at ``side`` pixels: the packed latent (which the PGD
    differentiates, so it requires grad), T5 hidden states, CLIP pooled output, ids, guidance."""
    config = transformer_config(variant, scale)
    tokens_side = side // 16  # VAE /8, then 2x2 packing
    gen = {"device": device, "dtype": dtype}
    latent = torch.randn(batch, tokens_side * tokens_side, config["in_channels"], **gen)
    inputs = {
        "hidden_states": latent.requires_grad_(True),
        "encoder_hidden_states": torch.randn(batch, text_tokens, config["joint_attention_dim"],
                                             **gen),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], **gen),
        "timestep": torch.full((batch,), 0.5, **gen),
        "img_ids": torch.zeros(tokens_side * tokens_side, 3, device=device),
        "txt_ids": torch.zeros(text_tokens, 3, device=device),
    }
    if config["guidance_embeds"]:
        inputs["guidance"] = torch.full((batch,), 3.5, **gen)
    return inputs
