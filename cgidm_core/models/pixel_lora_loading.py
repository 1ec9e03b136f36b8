"""Pixel LoRAs, unmerged: a LoRA file of a pixel ``UNet2DModel`` (diffusers' or kohya's layout, as
:mod:`cgidm_core.pixel_lora` writes them) attached to a loaded base as a peft adapter, switched on
for the fine-tuned model and off for the base, and removed again.

Why: diffusers gives ``UNet2DModel`` no LoRA loader, so pixel LoRAs used to be merged into a copy
of the base before cgidm could load them (two UNets per pair). Attached as an adapter, one UNet
serves both models of the pair, and an audit can swap many LoRAs of one base in and out of that
one loaded UNet (:mod:`cgidm_core.lora_swap`). Removing an adapter puts the base's own modules
back (peft keeps them as each wrapper's ``base_layer``, never modified), so the base computes
bit for bit what it computed before the LoRA was attached.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cgidm_core.errors import IncompatiblePairError
from cgidm_core.models.components import LORA_ADAPTER_NAME, loading_errors, remove_lora_layers
from cgidm_core.models.ddpm import DDPMPair
from cgidm_core.models.formats import lora_weights_file
from cgidm_core.models.pixel_flow import PixelFlowPair
from cgidm_core.models.stable_diffusion import AdapterSwitch, adapter_state_checkpoint
from cgidm_core.pair import Conditioning


def attach_pixel_lora(unet: torch.nn.Module, path: Path,
                      adapter_name: str = LORA_ADAPTER_NAME) -> int:
    """Inject the LoRA of ``path`` (a file, or the folder of ``pytorch_lora_weights.
    safetensors``) into ``unet`` as the peft adapter ``adapter_name``, frozen; returns the number
    of adapted layers. A file that does not fit this UNet is refused and nothing stays
    attached."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    from cgidm_core.pixel_lora import lora_config, read_lora_file

    weights = lora_weights_file(Path(path))
    state, rank, alpha = read_lora_file(weights, unet)
    targets = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    try:
        with loading_errors("the LoRA", weights, mismatch_is_incompatible=True):
            inject_adapter_in_model(lora_config(rank, alpha, targets), unet,
                                    adapter_name=adapter_name)
            result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
        if result.unexpected_keys:
            raise IncompatiblePairError(
                f"the LoRA in {weights} has layers this pixel UNet does not have "
                f"({result.unexpected_keys[0]}); was it fine-tuned from this base?")
    except BaseException:
        remove_lora_layers(unet)
        raise
    unet.requires_grad_(False)
    return sum(isinstance(m, BaseTunerLayer) for m in unet.modules())


class _SwitchedLora:
    """The adapter switching of a pixel pair whose two models are one UNet with a LoRA."""

    unet_pretrained: torch.nn.Module

    def _init_switch(self) -> None:
        self.unet_adapter = AdapterSwitch([self.unet_pretrained])

    def checkpoint_function(self) -> Callable[..., Any]:
        return adapter_state_checkpoint(self.unet_adapter)

    def eps_finetuned(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        self.unet_adapter.set(True)
        return super().eps_finetuned(z_t, t, cond)  # type: ignore[misc]

    def eps_pretrained(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning
                       ) -> torch.Tensor:
        self.unet_adapter.set(False)
        return super().eps_pretrained(z_t, t, cond)  # type: ignore[misc]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "lora_unet_layers": len(self.unet_adapter)}  # type: ignore[misc]


class DDPMLoraPair(_SwitchedLora, DDPMPair):
    """A pixel DDPM base and a LoRA of it: ONE UNet whose adapter is on for the fine-tune."""

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor,
                 **kwargs: Any) -> None:
        super().__init__(unet, unet, alphas_cumprod, finetuned_kind="lora", **kwargs)
        self._init_switch()


class PixelFlowLoraPair(_SwitchedLora, PixelFlowPair):
    """A pixel flow-matching base and a LoRA of it, on one UNet (see :class:`DDPMLoraPair`)."""

    def __init__(self, unet: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__(unet, unet, finetuned_kind="lora", **kwargs)
        self._init_switch()


__all__ = ["attach_pixel_lora", "remove_lora_layers", "DDPMLoraPair", "PixelFlowLoraPair"]
