"""The released diffusion transformers of the newer families, built on the meta device.

Configs written out from the released ``transformer/config.json`` of each model (nothing is
downloaded): Stable Diffusion 3.5 large and medium, Chroma (v1 / HD), Z-Image (Turbo),
Qwen-Image (and 2512, same transformer), Flux.2 Klein 4B / 9B and Flux.2 dev.
``benchmarks/activations.py`` counts what one PGD pass of one image saves for the backward
pass of each, at the family's native size, and ``benchmarks/family_memory.py`` turns the
counts and the weights into the batch that fits a card. :data:`EXPECTED_PARAMETERS` holds the
parameter counts these configs give; they match the sizes the releases state (SD 3.5 large
8.1 B, medium 2.2 B, Chroma 8.9 B, Z-Image 6.2 B, Qwen-Image 20.4 B, Klein 3.9 B and 9.1 B,
Flux.2 dev 32.2 B).

Each :class:`Transformer` also says how its pair calls it at the native size: image tokens
(4096 at 1024 px for all of them) and text tokens (the pipelines' ``max_sequence_length``
where they pad to it: T5's 256 + 77 CLIP for SD 3.5, T5's 512 for Chroma, Qwen3's 512 for
Klein, Mistral-3's 512 for dev; Z-Image and Qwen-Image keep only the prompt's own tokens, so
their count at 512 is an upper bound).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cgidm_testkit.full_size.flux import _built_in


@dataclass(frozen=True)
class Transformer:
    """One released transformer: its diffusers class and config, its pair's text length, and
    how to build its inputs for one call."""

    family: str
    variant: str
    class_name: str
    config: dict[str, Any]
    text_tokens: int
    inputs: Callable[[Transformer, int, int, torch.dtype, str], dict[str, Any]]

    def build(self, dtype: torch.dtype = torch.bfloat16, device: str = "meta") -> torch.nn.Module:
        import diffusers

        cls = getattr(diffusers, self.class_name)
        return _built_in(dtype, device, lambda: cls(**self.config)).requires_grad_(False)

    def call_inputs(self, side: int, dtype: torch.dtype, device: str = "meta",
                    batch: int = 1) -> dict[str, Any]:
        return self.inputs(self, side, batch, dtype, device)


def _latent(batch: int, tokens: int, channels: int, dtype: torch.dtype, device: str
            ) -> torch.Tensor:
    return torch.randn(batch, tokens, channels, device=device, dtype=dtype).requires_grad_(True)


def _sd3_inputs(spec: Transformer, side: int, batch: int, dtype: torch.dtype, device: str
                ) -> dict[str, Any]:
    gen = {"device": device, "dtype": dtype}
    return {
        "hidden_states": torch.randn(batch, 16, side // 8, side // 8, **gen).requires_grad_(True),
        "encoder_hidden_states": torch.randn(batch, spec.text_tokens, 4096, **gen),
        "pooled_projections": torch.randn(batch, 2048, **gen),
        "timestep": torch.full((batch,), 500.0, **gen),
    }


def _chroma_inputs(spec: Transformer, side: int, batch: int, dtype: torch.dtype, device: str
                   ) -> dict[str, Any]:
    tokens = (side // 16) ** 2
    gen = {"device": device, "dtype": dtype}
    return {
        "hidden_states": _latent(batch, tokens, 64, dtype, device),
        "encoder_hidden_states": torch.randn(batch, spec.text_tokens, 4096, **gen),
        "timestep": torch.full((batch,), 0.5, **gen),
        "img_ids": torch.zeros(tokens, 3, device=device),
        "txt_ids": torch.zeros(spec.text_tokens, 3, device=device),
    }


def _flux2_inputs(spec: Transformer, side: int, batch: int, dtype: torch.dtype, device: str
                  ) -> dict[str, Any]:
    tokens = (side // 16) ** 2
    gen = {"device": device, "dtype": dtype}
    return {
        "hidden_states": _latent(batch, tokens, 128, dtype, device),
        "encoder_hidden_states": torch.randn(batch, spec.text_tokens,
                                             spec.config["joint_attention_dim"], **gen),
        "timestep": torch.full((batch,), 0.5, **gen),
        "img_ids": torch.zeros(batch, tokens, 4, device=device),
        "txt_ids": torch.zeros(batch, spec.text_tokens, 4, device=device),
        **({"guidance": torch.full((batch,), 4.0, **gen)} if spec.config["guidance_embeds"]
           else {}),
    }


def _qwen_inputs(spec: Transformer, side: int, batch: int, dtype: torch.dtype, device: str
                 ) -> dict[str, Any]:
    grid = side // 16
    gen = {"device": device, "dtype": dtype}
    return {
        "hidden_states": _latent(batch, grid * grid, 64, dtype, device),
        "encoder_hidden_states": torch.randn(batch, spec.text_tokens,
                                             spec.config["joint_attention_dim"], **gen),
        "encoder_hidden_states_mask": torch.ones(batch, spec.text_tokens, device=device,
                                                 dtype=torch.long),
        "timestep": torch.full((batch,), 0.5, **gen),
        "img_shapes": [[(1, grid, grid)]] * batch,
    }


def _zimage_inputs(spec: Transformer, side: int, batch: int, dtype: torch.dtype, device: str
                   ) -> dict[str, Any]:
    gen = {"device": device, "dtype": dtype}
    return {
        "x": [torch.randn(16, 1, side // 8, side // 8, **gen).requires_grad_(True)
              for _ in range(batch)],
        "t": torch.full((batch,), 0.5, **gen),
        "cap_feats": [torch.randn(spec.text_tokens, spec.config["cap_feat_dim"], **gen)
                      for _ in range(batch)],
    }


SD35_LARGE = Transformer(
    "sd3", "3.5 large", "SD3Transformer2DModel",
    {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38,
     "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
     "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "out_channels": 16,
     "pos_embed_max_size": 192, "qk_norm": "rms_norm"},
    text_tokens=256 + 77, inputs=_sd3_inputs)
SD35_MEDIUM = Transformer(
    "sd3", "3.5 medium", "SD3Transformer2DModel",
    {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
     "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
     "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
     "pos_embed_max_size": 384, "qk_norm": "rms_norm",
     "dual_attention_layers": tuple(range(13))},
    text_tokens=256 + 77, inputs=_sd3_inputs)
CHROMA = Transformer(
    "chroma", "v1", "ChromaTransformer2DModel",
    {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
     "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
     "axes_dims_rope": (16, 56, 56), "approximator_num_channels": 64,
     "approximator_hidden_dim": 5120, "approximator_layers": 5},
    text_tokens=512, inputs=_chroma_inputs)
ZIMAGE = Transformer(
    "z-image", "Turbo", "ZImageTransformer2DModel",
    {"all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840,
     "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5,
     "qk_norm": True, "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0,
     "axes_dims": [32, 48, 48], "axes_lens": [1024, 512, 512]},
    text_tokens=512, inputs=_zimage_inputs)
QWEN_IMAGE = Transformer(
    "qwen-image", "Qwen-Image", "QwenImageTransformer2DModel",
    {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60,
     "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
     "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)},
    text_tokens=512, inputs=_qwen_inputs)
_KLEIN = {"patch_size": 1, "in_channels": 128, "attention_head_dim": 128,
          "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32),
          "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False}
FLUX2_KLEIN_4B = Transformer(
    "flux2", "Klein 4B", "Flux2Transformer2DModel",
    {**_KLEIN, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
     "joint_attention_dim": 7680},
    text_tokens=512, inputs=_flux2_inputs)
FLUX2_KLEIN_9B = Transformer(
    "flux2", "Klein 9B", "Flux2Transformer2DModel",
    {**_KLEIN, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
     "joint_attention_dim": 12288},
    text_tokens=512, inputs=_flux2_inputs)

#: FLUX.2-dev: 8 double- and 48 single-stream blocks, 6144 wide, Mistral-3 features of three
#: layers (3 x 5120), guidance-distilled (diffusers' defaults are dev's config).
FLUX2_DEV = Transformer(
    "flux2-dev", "dev", "Flux2Transformer2DModel",
    {**_KLEIN, "num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48,
     "joint_attention_dim": 15360, "guidance_embeds": True},
    text_tokens=512, inputs=_flux2_inputs)

#: Every variant counted, in the order the docs list them.
TRANSFORMERS: tuple[Transformer, ...] = (SD35_LARGE, SD35_MEDIUM, CHROMA, ZIMAGE, QWEN_IMAGE,
                                         FLUX2_KLEIN_4B, FLUX2_KLEIN_9B, FLUX2_DEV)
#: The variant each family's memory model (its registry entry) is counted for: the largest
#: one a user is likely to bring, so a batch sized from it fits the smaller ones too.
SIZING_VARIANT = {"sd3": SD35_LARGE, "chroma": CHROMA, "z-image": ZIMAGE,
                  "qwen-image": QWEN_IMAGE, "flux2": FLUX2_KLEIN_9B, "flux2-dev": FLUX2_DEV}

#: Parameter counts of these configs (diffusers 0.42, meta device); the sizing variants' are
#: the registry's ``MemoryModel.denoiser_parameters``, which tests/test_family_memory.py
#: re-counts.
EXPECTED_PARAMETERS: dict[str, int] = {
    "3.5 large": 8_056_627_520, "3.5 medium": 2_243_171_520, "v1": 8_899_983_424,
    "Turbo": 6_154_908_736, "Qwen-Image": 20_430_401_088, "Klein 4B": 3_875_544_576,
    "Klein 9B": 9_078_581_248, "dev": 32_223_281_152,
}
