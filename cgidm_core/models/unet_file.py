"""A fine-tune stored as ONE bare UNet weights file, with the base model's UNet config.

Trainers and model sites often hand out only the fine-tuned UNet's state dict in diffusers
naming (``conv_in.weight``, ``down_blocks.*``, ``time_embedding.*``) as a single
``.safetensors`` file, without its ``config.json``. A UNet fine-tune keeps its base's
architecture, so the base folder's ``unet/config.json`` (or a bare UNet folder's
``config.json``) builds the network and the file fills it. Every tensor must be there with the
config's shape: a file from another base is refused as an incompatible pair, not loaded with
half its layers random.

This is finetuned kind ``unet`` of :func:`cgidm_core.models.load_pair`; the service's worker loads
uploaded UNet files through it, and ``cgidm verify`` re-runs such a result from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cgidm_core.errors import IncompatiblePairError, ModelFormatError
from cgidm_core.models.formats import read_json, safetensors_keys
from cgidm_core.models.unet_configs import check_unet_family

#: The UNet classes a base's config may name, and the families they serve.
_CONDITIONAL = "UNet2DConditionModel"
_PIXEL = "UNet2DModel"


def base_unet_config_file(base_folder: Path) -> Path:
    """``unet/config.json`` of a pipeline folder, or ``config.json`` of a bare UNet folder."""
    for candidate in (base_folder / "unet" / "config.json", base_folder / "config.json"):
        if candidate.is_file():
            return candidate
    raise ModelFormatError(
        f"{base_folder} has no unet/config.json: a bare UNet weights file needs the base "
        "pipeline folder it was fine-tuned from for its architecture"
    )


def load_unet_file(weights: Path, base_folder: Path, dtype: Any, family: str | None = None) -> Any:
    """The UNet of ``base_folder``'s architecture with the tensors of ``weights``, in ``dtype``.

    ``family`` (``stable-diffusion``/``stable-diffusion-xl``) checks a conditional base UNet's
    family first; ``None`` for a pixel-space DDPM base.
    """
    import torch
    from safetensors.torch import load_file

    config_file = base_unet_config_file(base_folder)
    config = read_json(config_file)
    name = config.get("_class_name")
    if name == _CONDITIONAL:
        from diffusers import UNet2DConditionModel as UNetClass

        if family is not None:
            check_unet_family(config, config_file.parent, family)
    elif name == _PIXEL:
        from diffusers import UNet2DModel as UNetClass
    else:
        raise ModelFormatError(
            f"{config_file} describes a {name or 'unknown'} model; a bare UNet weights file can "
            f"only fill a {_CONDITIONAL} (Stable Diffusion, SDXL) or {_PIXEL} (pixel DDPM)"
        )
    safetensors_keys(weights)  # a corrupt or truncated file is refused with a clear message
    with torch.device("meta"):
        unet = UNetClass.from_config(config)
    try:
        state = load_file(str(weights))
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelFormatError(f"cannot read the UNet weights in {weights}: {exc}") from exc
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing tensors", missing), ("unexpected tensors", unexpected),
                  ("tensors of another shape", wrong)) if v]
        raise IncompatiblePairError(
            f"the UNet weights in {weights} do not fit the architecture of {config_file}: "
            + "; ".join(parts) + ". Was it fine-tuned from this base?"
        )
    unet.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    # Buffers that are not in a state dict (none in diffusers' UNets today) would stay on meta.
    if any(t.is_meta for t in (*unet.parameters(), *unet.buffers())):
        raise ModelFormatError(f"{weights} left parts of the UNet without weights")
    return unet.eval().requires_grad_(False)
