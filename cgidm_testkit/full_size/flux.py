"""The Flux.1 architecture (dev and schnell), built on the meta device or with random weights.

The configs are diffusers' for ``black-forest-labs/FLUX.1-dev`` / ``FLUX.1-schnell``:
``FluxTransformer2DModel`` (19 double-stream and 38 single-stream blocks, 24 heads of 128,
joint_attention_dim 4096 from T5, pooled projection 768 from CLIP-L, 64 input channels = the
16-channel VAE latent packed in 2x2 patches; ``guidance_embeds`` True for dev, False for
schnell), ``T5EncoderModel`` (T5 v1.1 XXL encoder), ``CLIPTextModel`` (ViT-L/14) and the
16-channel ``AutoencoderKL``, and the scheduler config that holds the time shift. Nothing is
downloaded (the tokenizers are built locally, ``build_t5_tokenizer``). At full size the
transformer alone is 12 B parameters (24 GB in bfloat16), so the memory benchmark counts it on
the meta device (``torch.device("meta")``: shapes and dtypes, no storage), and the GPU
benchmark builds it with random weights directly on the GPU; ``scale`` < 1 builds small ones
with real random weights for the CPU dry runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cgidm_testkit.full_size import sd15

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

#: ``FlowMatchEulerDiscreteScheduler`` config of FLUX.1-dev (dynamic shift: 3.16 at 1024 px).
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
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


def _built_in(dtype: torch.dtype, device: str, make):
    """``make()`` with parameters created in ``dtype`` on ``device`` directly: at full size a
    float32 copy on the way would be 48 GB (transformer) or 19 GB (T5)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = make()
    finally:
        torch.set_default_dtype(previous)
    # a module that pins its own parameter dtype is cast too (a no-op when none does)
    if any(p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype=dtype)
    return model


def build_transformer(variant: str = "dev", seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                      device: str = "meta", scale: float = 1.0):
    from diffusers import FluxTransformer2DModel

    sd15.seeded(seed)
    return _built_in(dtype, device,
                     lambda: FluxTransformer2DModel(**transformer_config(variant, scale)))


def t5_config(scale: float = 1.0) -> dict[str, Any]:
    """T5 v1.1 XXL's encoder config; ``scale`` < 1: a small one whose width (32) is the small
    transformer's ``joint_attention_dim``."""
    config = dict(T5_CONFIG)
    if scale < 1.0:
        config.update(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8)
    return config


def build_t5(dtype: torch.dtype = torch.bfloat16, device: str = "meta", *, seed: int = 3,
             scale: float = 1.0):
    from transformers import T5Config, T5EncoderModel

    sd15.seeded(seed)
    config = T5Config(**t5_config(scale), pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    return _built_in(dtype, device, lambda: T5EncoderModel(config)).eval()


def build_clip(dtype: torch.dtype = torch.bfloat16, device: str = "meta", *, seed: int = 2,
               scale: float = 1.0, tokenizer: Any = None):
    """CLIP ViT-L/14's text encoder (its pooled output is Flux's ``pooled_projections``);
    ``tokenizer`` sets the special token ids (a random encoder reads any ids)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = dict(sd15.TEXT_ENCODER_CONFIG)
    if scale < 1.0:
        config.update(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, projection_dim=32)
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    sd15.seeded(seed)
    return _built_in(dtype, device, lambda: CLIPTextModel(CLIPTextConfig(**config))).eval()


def build_vae(dtype: torch.dtype = torch.float32, device: str = "meta", *, seed: int = 1,
              scale: float = 1.0):
    """The 16-channel VAE; ``scale`` < 1: two small blocks (a latent pixel is 2x2 image pixels)
    with a native side of 32 px, so a 16x16 latent and 64 packed tokens."""
    from diffusers import AutoencoderKL

    config = dict(VAE_CONFIG)
    if scale < 1.0:
        config.update(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                      up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1,
                      norm_num_groups=4, sample_size=32)
    sd15.seeded(seed)
    return _built_in(dtype, device, lambda: AutoencoderKL(**config))


def build_t5_tokenizer(model_max_length: int = T5_TOKENS):
    """A working T5-style tokenizer built locally (the real spiece model cannot be fetched): a
    character-level Unigram vocabulary with T5's ``<pad>`` = 0 and ``</s>`` = 1. Its ids are a
    subset of T5's 32128, so the random T5 reads them; the sequence is padded to the same
    512 tokens either way, which is what the cost depends on."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from cgidm_testkit.tinymodels import write_tiny_t5_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="cgidm-flux-t5tok-"))
    try:
        return AutoTokenizer.from_pretrained(
            str(write_tiny_t5_tokenizer(folder, model_max_length=model_max_length)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
