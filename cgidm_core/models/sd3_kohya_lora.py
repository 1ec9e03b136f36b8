"""kohya-ss SD3 / SD 3.5 LoRAs (sd-scripts' ``sd3_train_network.py``) in diffusers/peft naming.

diffusers 0.42's ``SD3LoraLoaderMixin.lora_state_dict`` has no converter for them (it has for
kohya's SD, SDXL and Flux.1 LoRAs), so this module is the one place cgidm converts a LoRA by
hand; the result goes through diffusers' own SD3 loader like any diffusers LoRA.

sd-scripts names a layer after Stability's MMDiT module path with dots as underscores, under
``lora_unet_`` (the transformer), ``lora_te1_`` (CLIP-L), ``lora_te2_`` (CLIP-G) and
``lora_te3_`` (T5), each with ``lora_down.weight`` (rank x in), ``lora_up.weight`` (out x rank)
and a scalar ``alpha``. The conversion is exact:

- ``alpha / rank`` is folded into the down matrix (peft then scales by 1);
- a fused ``qkv`` layer becomes diffusers' three projections: the up matrix split in three along
  its outputs, each with the whole down matrix (``up_q @ down`` is the q rows of ``up @ down``);
- the modulations diffusers orders (scale, shift) where Stability orders (shift, scale) (the last
  block's pre-only context modulation, the final layer's) get their up matrix's two halves
  swapped; a context modulation is pre-only when it has 2 chunks (``rows == 2 * in``);
- T5 layers (``lora_te3_``) are refused: diffusers' SD3 loader does not load T5 LoRAs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from cgidm_core.errors import ModelFormatError

KOHYA_TRANSFORMER_PREFIX = "lora_unet_"

#: Stability's module names inside a joint block -> diffusers' (three for a fused qkv).
_BLOCK_MODULES: dict[str, tuple[str, ...]] = {
    "x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block_attn_proj": ("attn.to_out.0",),
    "x_block_attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block_attn2_proj": ("attn2.to_out.0",),
    "x_block_mlp_fc1": ("ff.net.0.proj",),
    "x_block_mlp_fc2": ("ff.net.2",),
    "x_block_adaLN_modulation_1": ("norm1.linear",),
    "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block_attn_proj": ("attn.to_add_out",),
    "context_block_mlp_fc1": ("ff_context.net.0.proj",),
    "context_block_mlp_fc2": ("ff_context.net.2",),
    "context_block_adaLN_modulation_1": ("norm1_context.linear",),
}
#: Stability's modules outside the joint blocks (sd-scripts' ``emb_dims``) -> diffusers'.
_OUTER_MODULES: dict[str, str] = {
    "context_embedder": "context_embedder",
    "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
    "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
    "x_embedder_proj": "pos_embed.proj",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
_BLOCK = re.compile(r"joint_blocks_(\d+)_(.+)")
_CLIP = re.compile(r"lora_te([12])_text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)")


def is_kohya_sd3_lora(keys: list[str]) -> bool:
    """sd-scripts' ``sd3_train_network.py`` naming."""
    return any(k.startswith(KOHYA_TRANSFORMER_PREFIX + "joint_blocks_") for k in keys)


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _transformer_targets(name: str, down: torch.Tensor, up: torch.Tensor
                         ) -> tuple[tuple[str, ...], torch.Tensor]:
    """diffusers' module names for a ``lora_unet_`` layer and its up matrix (swapped where the
    two orders differ)."""
    if name in _OUTER_MODULES:
        target = _OUTER_MODULES[name]
        return (target,), _swap_halves(up) if target == "norm_out.linear" else up
    match = _BLOCK.fullmatch(name)
    if match is None or match.group(2) not in _BLOCK_MODULES:
        raise ModelFormatError(f"{KOHYA_TRANSFORMER_PREFIX}{name}: not a layer of an SD3 "
                               "transformer that cgidm can convert")
    block, module = match.groups()
    targets = tuple(f"transformer_blocks.{block}.{m}" for m in _BLOCK_MODULES[module])
    if module == "context_block_adaLN_modulation_1" and up.shape[0] == 2 * down.shape[1]:
        up = _swap_halves(up)  # the last block's pre-only (shift, scale) -> (scale, shift)
    return targets, up


def _clip_target(name: str) -> str:
    match = _CLIP.fullmatch(name)
    if match is None:
        raise ModelFormatError(f"{name}: not a CLIP text-encoder layer cgidm can convert")
    encoder, layer, block, module = match.groups()
    prefix = "text_encoder" if encoder == "1" else "text_encoder_2"
    return f"{prefix}.text_model.encoder.layers.{layer}.{block}.{module}"


def convert_kohya_sd3_lora(state: dict[str, torch.Tensor], source: Path | str = "the LoRA"
                           ) -> dict[str, torch.Tensor]:
    """A kohya-ss SD3 LoRA state dict as the diffusers/peft one with the same weights
    (``transformer.*`` / ``text_encoder.*`` / ``text_encoder_2.*``, ``lora_A`` / ``lora_B``)."""
    names = sorted({key.split(".", 1)[0] for key in state})
    if any(name.startswith("lora_te3_") for name in names):
        raise ModelFormatError(f"{source} holds T5 (lora_te3_*) LoRA layers, which diffusers' "
                               "SD3 loader does not load; retrain without --train_t5xxl")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        try:
            down = state[f"{name}.lora_down.weight"]
            up = state[f"{name}.lora_up.weight"]
        except KeyError:
            raise ModelFormatError(f"{source}: {name} has no lora_down/lora_up pair") from None
        alpha = state.get(f"{name}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        down = down * scale
        if name.startswith(KOHYA_TRANSFORMER_PREFIX):
            targets, up = _transformer_targets(name[len(KOHYA_TRANSFORMER_PREFIX):], down, up)
            targets = tuple(f"transformer.{t}" for t in targets)
        else:
            targets = (_clip_target(name),)
        for target, part in zip(targets, up.chunk(len(targets), dim=0), strict=True):
            out[f"{target}.lora_A.weight"] = down.clone()
            out[f"{target}.lora_B.weight"] = part.clone()
    return out


def read_kohya_sd3_lora(weights: Path) -> dict[str, Any]:
    """The file's tensors, converted (:func:`convert_kohya_sd3_lora`)."""
    from safetensors.torch import load_file

    return convert_kohya_sd3_lora(load_file(str(weights)), weights)
