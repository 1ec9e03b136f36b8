"""SDXL v-prediction and zero-terminal-SNR checkpoints (NoobAI-XL v-pred and its descendants):
recognised from their files and run with the objective they were trained with.

A v-prediction UNet outputs ``v = sqrt(abar) eps - sqrt(1 - abar) x0``; one trained with zero
terminal SNR also used the rescaled schedule (``rescale_betas_zero_snr``: ``abar_T = 0``), a
different ``abar`` at every step. Running such a model as an epsilon model on the usual schedule
silently gives wrong noise predictions, so the objective is read wherever the files record it:

- a diffusers pipeline folder: its scheduler config (``prediction_type``,
  ``rescale_betas_zero_snr``), which the SD/SDXL loaders already honour;
- a single file: the empty marker tensors ``v_pred`` and ``ztsnr`` that v-pred checkpoints
  carry (the convention ComfyUI's model detection reads; diffusers 0.42's ``from_single_file``
  ignores them and would build an epsilon scheduler);
- a kohya-ss LoRA: ``ss_v_parameterization`` / ``ss_zero_terminal_snr`` in its header, which
  must agree with the base it is attached to.

The contrast itself stays in noise space (``predictions.output_to_eps`` converts ``v`` with the
schedule's ``abar``), so a v-pred fine-tune of an epsilon base is a valid pair as long as both
share one schedule; a zero-terminal-SNR model against a base on the usual schedule is refused
(the two models were trained on different ``x_t`` at the same ``t``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgidm_core.errors import IncompatiblePairError

#: Marker tensors in v-pred single files (their values are empty; their presence is the flag).
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"


@dataclass(frozen=True)
class Objective:
    """What a model was trained to predict, as far as its files say (``None``: not recorded)."""

    prediction_type: str | None = None
    zero_terminal_snr: bool | None = None
    source: str = ""


def single_file_objective(keys: list[str], where: Path | str = "") -> Objective:
    """From a single file's tensor names: ``v_pred`` -> v-prediction, ``ztsnr`` -> zero terminal
    SNR; a file with neither records nothing (most epsilon checkpoints carry no marker)."""
    names = set(keys)
    if V_PRED_KEY not in names:
        return Objective()
    return Objective("v_prediction", ZTSNR_KEY in names, f"{where}: '{V_PRED_KEY}' marker")


def _flag(raw: str | None) -> bool | None:
    return None if raw is None else raw.strip().lower() in ("true", "1")


def lora_objective(metadata: dict[str, str], where: Path | str = "") -> Objective:
    """From kohya-ss's LoRA metadata (``ss_v_parameterization``, ``ss_zero_terminal_snr``)."""
    v_param = _flag(metadata.get("ss_v_parameterization"))
    if v_param is None:
        return Objective()
    return Objective("v_prediction" if v_param else "epsilon",
                     _flag(metadata.get("ss_zero_terminal_snr")),
                     f"{where}: ss_v_parameterization")


def scheduler_zero_terminal_snr(config: Any) -> bool:
    """Whether a scheduler config uses the zero-terminal-SNR rescaled schedule."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return bool(get("rescale_betas_zero_snr", False))


def mark_converted_base(folder: Path, keys: list[str]) -> Objective:
    """Write a converted single-file base's objective into its scheduler config (diffusers'
    conversion leaves the epsilon default); idempotent, so a folder converted before this rule
    existed is corrected on its next use."""
    objective = single_file_objective(keys, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    if objective.prediction_type is None or not config_file.is_file():
        return objective
    config = json.loads(config_file.read_text(encoding="utf-8"))
    wanted = {"prediction_type": objective.prediction_type,
              "rescale_betas_zero_snr": bool(objective.zero_terminal_snr)}
    if any(config.get(k) != v for k, v in wanted.items()):
        config.update(wanted)
        config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return objective


def check_finetune_objective(found: Objective, base_scheduler: Any, where: Path) -> None:
    """Refuse a fine-tune whose recorded objective cannot be compared with the base's: another
    noise schedule (zero terminal SNR on one side only), or a LoRA trained as v-prediction on
    an epsilon base or the reverse (a LoRA predicts what its base predicts)."""
    base_ztsnr = scheduler_zero_terminal_snr(base_scheduler)
    if found.zero_terminal_snr is not None and found.zero_terminal_snr != base_ztsnr:
        said = "with" if found.zero_terminal_snr else "without"
        raise IncompatiblePairError(
            f"{where} was trained {said} zero terminal SNR ({found.source}) but the pretrained "
            f"model {'uses' if base_ztsnr else 'does not use'} that schedule: the two models saw "
            "different noisy inputs at every step; compare it with the base it was trained from "
            "(e.g. the v-prediction base for a v-pred fine-tune)")


def check_lora_objective(metadata: dict[str, str], base_prediction: str, base_scheduler: Any,
                         where: Path) -> Objective:
    found = lora_objective(metadata, where)
    if found.prediction_type is not None and found.prediction_type != base_prediction:
        raise IncompatiblePairError(
            f"{where} was trained as a {found.prediction_type} LoRA ({found.source}) but the "
            f"pretrained model predicts {base_prediction}: a LoRA predicts what its base does; "
            "give the base it was trained on (a v-prediction base such as NoobAI-XL v-pred for a "
            "v-parameterization LoRA)")
    check_finetune_objective(found, base_scheduler, where)
    return found
