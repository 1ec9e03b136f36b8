"""Where the networks run and in which precision.

Defaults follow what works on each device: half precision on a GPU (the paper's setting, and half
the memory), float32 on a CPU where half precision is slow or unsupported.
"""

from __future__ import annotations

import torch

from cgidm_core.errors import ConfigError

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
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        resolved = _DTYPE_NAMES.get(str(dtype).strip().lower().replace("torch.", ""))
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
    return resolved


def unique_modules(modules: list[torch.nn.Module | None]) -> list[torch.nn.Module]:
    """Each network once (by identity), in order: shared networks must not be counted twice."""
    seen: set[int] = set()
    out = []
    for module in modules:
        if module is not None and id(module) not in seen:
            seen.add(id(module))
            out.append(module)
    return out
