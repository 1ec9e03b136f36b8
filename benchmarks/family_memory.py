#!/usr/bin/env python
"""What each family needs on a GPU and the PGD batch that fits a 24 / 48 / 80 / 141 GB card,
from the family registry's memory models (``cgidm_core/families.py``, ``Family.memory``).

Nothing here runs on a GPU and nothing is measured on one: the activation bytes are the
meta-device counts of ``benchmarks/activations.py`` (saved-for-backward tensors of one pass of
the released denoiser at full size, fused attention, weights frozen) that the registry holds,
planned exactly as the worker plans a batch (:func:`cgidm_core.models.devices.family_batch_size`:
two passes per image, 10% overhead, 85% of the free memory, at most 32 images); the weights are
the registry's denoiser parameter counts in the family's GPU dtype (2 bytes) plus the VAE in
float32. Text encoders are not counted: a pair releases them once the prompt is encoded.

    python -m benchmarks.family_memory            # the markdown table of docs/FAMILIES.md
    python -m benchmarks.family_memory --json family_memory.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

GB = 10**9
GIB = 2**30
#: Cards by their marketed size (decimal GB, as sold), less ~0.5 GiB of CUDA context.
CARDS_GB = (24, 48, 80, 141)
CUDA_CONTEXT = int(0.5 * GIB)
#: VAE parameters (float32 in every pair), counted on the meta device with diffusers 0.42:
#: SD/SDXL's 4-channel VAE, the 16-channel Flux.1 VAE (also SD 3.x's, Chroma's, Z-Image's),
#: ``AutoencoderKLQwenImage`` and ``AutoencoderKLFlux2``.
VAE_PARAMETERS = {"stable-diffusion": 83_653_863, "stable-diffusion-xl": 83_653_863,
                  "flux": 83_819_683, "chroma": 83_819_683, "sd3": 83_819_683,
                  "z-image": 83_819_683, "qwen-image": 126_892_531, "flux2": 84_046_115,
                  "flux2-dev": 84_046_115}
#: A LoRA pair holds one denoiser (the adapter switched on and off), a full fine-tune two.
LAYOUTS = {"lora": 1, "full": 2}


def rows() -> list[dict[str, Any]]:
    """One row per registered family with a memory model, from the registry alone."""
    import torch

    from cgidm_core.families import FAMILIES
    from cgidm_core.models.devices import family_batch_size, image_activation_bytes

    out = []
    for family in FAMILIES:
        memory = family.memory
        if memory is None:
            continue
        dtype = getattr(torch, family.defaults.gpu_dtype)
        per_image = {ckpt: image_activation_bytes(family.name, memory.native_latent_pixels,
                                                  dtype, ckpt) for ckpt in (False, True)}
        denoiser = memory.denoiser_parameters * dtype.itemsize
        vae = VAE_PARAMETERS[family.name] * 4
        row: dict[str, Any] = {
            "family": family.name, "title": family.title, "side": family.defaults.resolution,
            "dtype": family.defaults.gpu_dtype, "parameters": memory.denoiser_parameters,
            "weights": {layout: n * denoiser + vae for layout, n in LAYOUTS.items()},
            "image_bytes": {"off": per_image[False], "on": per_image[True]},
            "note": memory.note, "batch": {},
        }
        for layout, weights in row["weights"].items():
            for ckpt in (False, True):
                for card in CARDS_GB:
                    free = card * GB - CUDA_CONTEXT - weights
                    fits = free > 0 and per_image[ckpt] <= 0.85 * free
                    batch = family_batch_size(free, family.name, memory.native_latent_pixels,
                                              dtype, ckpt) if fits else 0
                    row["batch"][f"{layout}/{'on' if ckpt else 'off'}/{card}"] = batch
        out.append(row)
    return out


def _batches(row: dict[str, Any], layout: str, ckpt: str) -> str:
    return " / ".join(str(row["batch"][f"{layout}/{ckpt}/{card}"]) for card in CARDS_GB)


def markdown(table: list[dict[str, Any]]) -> str:
    cards = "/".join(str(c) for c in CARDS_GB)
    lines = [
        f"| family (side, dtype) | denoiser parameters | weights GB: LoRA pair / full pair | "
        f"activations per image GB: plain / checkpointed | batch on {cards} GB, LoRA pair: "
        f"plain; checkpointed | batch on {cards} GB, full pair: plain; checkpointed |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['family']} ({r['side']} px, {r['dtype']}) | {r['parameters'] / 1e9:.2f} B | "
            f"{r['weights']['lora'] / GB:.1f} / {r['weights']['full'] / GB:.1f} | "
            f"{r['image_bytes']['off'] / GB:.1f} / {r['image_bytes']['on'] / GB:.2f} | "
            f"{_batches(r, 'lora', 'off')}; {_batches(r, 'lora', 'on')} | "
            f"{_batches(r, 'full', 'off')}; {_batches(r, 'full', 'on')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args(argv)
    table = rows()
    print(markdown(table))
    print("\n0: not even one image fits beside the weights. Modelled from meta-device counts, "
          "not measured on a GPU.")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
