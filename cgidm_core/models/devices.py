"""Where the networks run and in which precision.

Defaults follow what works on each device: half precision on a GPU (the paper's setting, and half
the memory), float32 on a CPU where half precision is slow or unsupported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cgidm_core.errors import ConfigError
from cgidm_core.families import FAMILIES

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" picks the GPU when there is one."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but there is no CUDA GPU; use 'cpu'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto" means float16 on CUDA and float32 elsewhere."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    resolved: torch.dtype | None
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        resolved = _DTYPE_NAMES.get(str(dtype).strip().lower().replace("torch.", ""))
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
    return resolved


def unique_modules(modules: Sequence[torch.nn.Module | None]) -> list[torch.nn.Module]:
    """Each network once (by identity), in order: shared networks must not be counted twice."""
    seen: set[int] = set()
    out = []
    for module in modules:
        if module is not None and id(module) not in seen:
            seen.add(id(module))
            out.append(module)
    return out


#: GPU memory one image adds to a PGD batch of a Stable Diffusion pair (two UNet forward and
#: backward passes, activations kept for the input gradient), for a 4x64x64 latent in a 2-byte
#: dtype. Measured on an H200 with SD 1.5 sizes (benchmarks/gpu.py, 2026-11-29): 1.47-1.54 GiB
#: per image in float16 at batch 8-32, 3.05-3.09 GiB in float32; rounded up for headroom.
SD_BYTES_PER_IMAGE = int(1.6 * 2**30)
SD_REFERENCE_LATENT_PIXELS = 64 * 64
#: Largest default GPU batch. On the H200 the step time is flat up to batch 8 (launch-bound:
#: 0.18 s at batch 1 and at 8 in float16) and images per hour still grow to batch 32
#: (1,400 -> 1,870 -> 2,440 at batch 8, 16, 32); beyond 32 the gain was not measured.
MAX_GPU_BATCH = 32
#: Share of the free GPU memory a default batch may plan to use (the rest is headroom for the
#: allocator's fragmentation and the VAE's decode).
GPU_MEMORY_SHARE = 0.85


def available_gpu_bytes(device: torch.device) -> int:
    """Memory a new batch can get: free on the card plus what torch's allocator holds unused."""
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached))


def gpu_batch_size(available_bytes: int, latent_pixels: int, dtype: torch.dtype,
                   bytes_per_image: int = SD_BYTES_PER_IMAGE) -> int:
    """How many images fit one PGD batch: activations scale with latent area and dtype width."""
    area = latent_pixels / SD_REFERENCE_LATENT_PIXELS
    per_image = bytes_per_image * area * (dtype.itemsize / 2)
    return max(1, min(MAX_GPU_BATCH, int(GPU_MEMORY_SHARE * available_bytes // per_image)))


# -- memory per image, per family --------------------------------------------------------------

#: Saved-for-backward bytes of ONE denoiser pass of one image in a 2-byte dtype, counted on the
#: meta device by ``benchmarks/activations.py`` (fused attention, weights frozen) at the family's
#: native side and at half of it: ``{family: {(side, checkpointing): bytes}}``, read from each
#: family's registry entry (``Family.memory``, :mod:`cgidm_core.families`). The count for SD
#: 1.5 (2 x 0.72 GiB per image) matches what benchmarks/gpu.py measured on an H200 (1.47-1.54
#: GiB per image in float16); ``tests/test_family_memory.py`` re-counts every entry. A new family
#: adds its counts to its registry entry and gets batch sizing and the checkpointing decision
#: with no code of its own.
ACTIVATION_COUNTS: dict[str, dict[tuple[int, bool], int]] = {
    family.name: dict(family.memory.activation_counts)
    for family in FAMILIES if family.memory is not None
}
#: Latent pixels (height x width of the VAE latent) of each family at its native side.
NATIVE_LATENT_PIXELS = {family.name: family.memory.native_latent_pixels
                        for family in FAMILIES if family.memory is not None}
#: Denoiser passes per image and PGD step: the fine-tuned and the pretrained model.
PASSES_PER_IMAGE = 2
#: Allocator rounding, cuBLAS/cuDNN workspaces and the recomputed segment under checkpointing.
ACTIVATION_OVERHEAD = 1.1


def image_activation_bytes(family: str, latent_pixels: int, dtype: torch.dtype,
                           checkpointing: bool = False) -> int:
    """GPU memory one image adds to a PGD batch of ``family`` at ``latent_pixels``.

    Each family's count is a fixed part (text tokens: Flux attends over 512 T5 tokens whatever
    the image size) plus a part linear in the latent area (convolutions, and attention over
    image tokens with a fused kernel), fitted through the two counted sides. A family without
    counts falls back on Stable Diffusion's, scaled by area.
    """
    counts = ACTIVATION_COUNTS.get(family, ACTIVATION_COUNTS["stable-diffusion"])
    native_pixels = NATIVE_LATENT_PIXELS.get(family, NATIVE_LATENT_PIXELS["stable-diffusion"])
    sides = sorted({side for side, _ in counts})
    small_side, big_side = sides[0], sides[-1]
    big, small = counts[(big_side, checkpointing)], counts[(small_side, checkpointing)]
    shrink = (small_side / big_side) ** 2
    per_area = (big - small) / (1.0 - shrink)
    fixed = max(0.0, big - per_area)
    area = latent_pixels / native_pixels
    per_pass = fixed + per_area * area
    return int(PASSES_PER_IMAGE * per_pass * ACTIVATION_OVERHEAD * dtype.itemsize / 2)


def family_batch_size(available_bytes: int, family: str, latent_pixels: int, dtype: torch.dtype,
                      checkpointing: bool = False) -> int:
    """How many images of ``family`` fit one PGD batch in ``available_bytes`` (at least 1)."""
    per_image = image_activation_bytes(family, latent_pixels, dtype, checkpointing)
    return max(1, min(MAX_GPU_BATCH, int(GPU_MEMORY_SHARE * available_bytes // per_image)))


def checkpointing_needed(available_bytes: int, family: str, latent_pixels: int,
                         dtype: torch.dtype) -> bool:
    """True when not even one image fits without gradient checkpointing (what "auto" asks)."""
    per_image = image_activation_bytes(family, latent_pixels, dtype, checkpointing=False)
    return per_image > GPU_MEMORY_SHARE * available_bytes
