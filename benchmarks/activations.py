#!/usr/bin/env python
"""Activation memory per image of each family's denoiser, counted on the meta device.

The PGD differentiates the contrast loss with respect to the input only (weights frozen), so
what one image costs on a GPU beyond the weights is what autograd saves for the backward pass
of the two denoiser passes (fine-tuned and pretrained). This script builds each denoiser at
full size on the meta device (no storage, no download, seconds on a CPU), runs one forward pass
of one image at the given size with ``torch.autograd.graph.saved_tensors_hooks`` and adds up
the bytes of every distinct saved tensor that is not a weight. Attention is counted as a fused
kernel (flash / memory-efficient SDPA, which a GPU uses) saves it: q, k, v, the output and the
log-sum-exp, never the L x L matrix (the meta device would otherwise take the math path).

Calibration: SD 1.5 at 512 px counts 0.72 GiB per pass in float16, 1.44 GiB per image for the
two passes; benchmarks/gpu.py measured 1.47-1.54 GiB per image on an H200 (2026-11-29). The
constants in ``cgidm_core/models/devices.py`` (``ACTIVATIONS``) come from this script and add
``ACTIVATION_OVERHEAD`` (10%) for the allocator and workspaces; ``tests/test_family_memory.py``
checks them against the count, so a diffusers change that moves them fails.

    python -m benchmarks.activations            # table + what fits a 24 GB card
    python -m benchmarks.activations --json activations.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

GIB = 2**30


class _FusedAttention(torch.autograd.Function):
    """What flash / memory-efficient attention keeps for backward: q, k, v, output, logsumexp."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _fused_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor:
    return _FusedAttention.apply(query, key, value)


def saved_bytes(model: torch.nn.Module, inputs: dict[str, Any]) -> int:
    """Bytes autograd keeps for one forward pass of ``model`` on ``inputs`` (meta tensors),
    weights and buffers excluded, each saved storage counted once."""
    weights = {id(t) for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, tuple[torch.Tensor, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(tensor) not in weights and id(base) not in weights:
            kept.setdefault(id(base), (base, base.numel() * base.element_size()))
        return tensor

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(**inputs)
    finally:
        F.scaled_dot_product_attention = original
    return sum(size for _, size in kept.values())


# -- the families ------------------------------------------------------------------------------


def _unet_inputs(side: int, dtype: torch.dtype, context: int, xl: bool) -> dict[str, Any]:
    meta = {"device": "meta", "dtype": dtype}
    inputs: dict[str, Any] = {
        "sample": torch.randn(1, 4, side // 8, side // 8, **meta).requires_grad_(True),
        "timestep": torch.tensor([500], device="meta"),
        "encoder_hidden_states": torch.randn(1, 77, context, **meta),
    }
    if xl:
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280, **meta),
                                       "time_ids": torch.randn(1, 6, **meta)}
    return inputs


def denoiser(family: str, dtype: torch.dtype) -> torch.nn.Module:
    """The family's full-size denoiser on the meta device, frozen (for the transformer families
    of ``cgidm_testkit/full_size/transformers.py``: the variant their batch is sized for)."""
    from cgidm_testkit.full_size import flux, sd15, sdxl, transformers

    if family == "stable-diffusion":
        model = sd15.build_unet(dtype=dtype, device="meta")
    elif family == "stable-diffusion-xl":
        model = sdxl.build_unet(dtype=dtype, device="meta")
    elif family == "flux":
        model = flux.build_transformer(dtype=dtype, device="meta")
    elif family in transformers.SIZING_VARIANT:
        model = transformers.SIZING_VARIANT[family].build(dtype, "meta")
    else:
        raise ValueError(f"unknown family {family!r}")
    return model.requires_grad_(False)


def inputs_for(family: str, side: int, dtype: torch.dtype) -> dict[str, Any]:
    from cgidm_testkit.full_size import flux, transformers

    if family == "flux":
        return flux.packed_inputs(1, side, dtype, "meta")
    if family in transformers.SIZING_VARIANT:
        return transformers.SIZING_VARIANT[family].call_inputs(side, dtype, "meta")
    return _unet_inputs(side, dtype, 2048 if family == "stable-diffusion-xl" else 768,
                        family == "stable-diffusion-xl")


def count(family: str, side: int, dtype: torch.dtype = torch.float16,
          checkpointing: bool = False, model: torch.nn.Module | None = None) -> int:
    """Saved bytes of ONE denoiser pass of one image (the PGD makes two per image)."""
    model = model if model is not None else denoiser(family, dtype)
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    return saved_bytes(model, inputs_for(family, side, dtype))


FAMILIES = {"stable-diffusion": (512, 256), "stable-diffusion-xl": (1024, 512),
            "flux": (1024, 512), "sd3": (1024, 512), "chroma": (1024, 512),
            "z-image": (1024, 512), "qwen-image": (1024, 512), "flux2": (1024, 512),
            "flux2-dev": (1024, 512)}
#: Families computed in bfloat16 on a GPU (the rest in float16); counts are per 2-byte dtype.
BF16_FAMILIES = {"flux", "sd3", "chroma", "z-image", "qwen-image", "flux2", "flux2-dev"}


def measure(only: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    rows = []
    for family, sides in FAMILIES.items():
        if only and family not in only:
            continue
        dtype = torch.bfloat16 if family in BF16_FAMILIES else torch.float16
        model = denoiser(family, dtype)
        for side in sides:
            for checkpointing in (False, True):
                rows.append({"family": family, "side": side, "dtype": str(dtype)[6:],
                             "checkpointing": checkpointing,
                             "pass_bytes": count(family, side, dtype, checkpointing, model)})
    return rows


def fits_24gb() -> list[dict[str, Any]]:
    """Whether one image fits a 24 GB card (22.0 GiB usable after the CUDA context) for each
    family and pair layout at native size, from the estimates cgidm plans with."""
    from cgidm_core.models.devices import GPU_MEMORY_SHARE, image_activation_bytes

    card = 24e9 - 0.5 * GIB  # 24 GB card less ~0.5 GiB of CUDA context and kernels
    weights = {  # 2-byte denoisers + float32 VAE (+ a LoRA adapter, negligible)
        ("stable-diffusion", "full"): 2 * 859.5e6 * 2 + 83.7e6 * 4,
        ("stable-diffusion", "lora"): 859.5e6 * 2 + 83.7e6 * 4,
        ("stable-diffusion-xl", "full"): 2 * 2567.5e6 * 2 + 83.7e6 * 4,
        ("stable-diffusion-xl", "lora"): 2567.5e6 * 2 + 83.7e6 * 4,
        ("flux", "full"): 2 * 11901.4e6 * 2 + 83.8e6 * 4,
        ("flux", "lora"): 11901.4e6 * 2 + 83.8e6 * 4,
    }
    native = {"stable-diffusion": 64 * 64, "stable-diffusion-xl": 128 * 128, "flux": 128 * 128}
    out = []
    for (family, layout), held in weights.items():
        dtype = torch.bfloat16 if family == "flux" else torch.float16
        free = card - held
        plain = image_activation_bytes(family, native[family], dtype, checkpointing=False)
        ckpt = image_activation_bytes(family, native[family], dtype, checkpointing=True)
        out.append({"family": family, "layout": layout, "weights_gib": held / GIB,
                    "free_gib": free / GIB, "image_gib": plain / GIB,
                    "image_checkpointed_gib": ckpt / GIB,
                    "fits": free > 0 and plain <= GPU_MEMORY_SHARE * free,
                    "fits_checkpointed": free > 0 and ckpt <= GPU_MEMORY_SHARE * free})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    rows = measure()
    print("| family | side (px) | dtype | gradient checkpointing | saved per pass (GiB) | "
          "per image, two passes (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['side']} | {r['dtype']} | "
              f"{'on' if r['checkpointing'] else 'off'} | {r['pass_bytes'] / GIB:.3f} | "
              f"{2 * r['pass_bytes'] / GIB:.3f} |")
    fits = fits_24gb()
    print("\nOne image at native size on a 24 GB card (planned with cgidm's estimates, "
          "incl. 10% overhead and the 0.85 share):\n")
    print("| family | pair | weights (GiB) | left (GiB) | image (GiB) | image, checkpointed "
          "(GiB) | fits | fits checkpointed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in fits:
        print(f"| {r['family']} | {r['layout']} | {r['weights_gib']:.1f} | {r['free_gib']:.1f} "
              f"| {r['image_gib']:.2f} | {r['image_checkpointed_gib']:.2f} | "
              f"{'yes' if r['fits'] else 'no'} | {'yes' if r['fits_checkpointed'] else 'no'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"passes": rows, "card_24gb": fits}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
