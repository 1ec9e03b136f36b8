"""LoRAs of one base swapped in and out of one loaded base, for audits.

Why: an audit of a hub's LoRAs of one base would otherwise load the base once per model (a
LoRA pair is the base plus a few MB of adapter). :class:`LoraSwapLoader` keeps the base loaded
and, for each LoRA model, attaches the LoRA as a peft adapter, hands the pair to the audit, and
removes the adapter when the model is done, which puts the base's own modules back (peft never
modifies them: the base computes bit for bit what it computed before; a test checks it).

Which models swap: LoRA files of a pixel base (DDPM or flow matching, diffusers or kohya layout,
:mod:`cgidm_core.models.pixel_lora_loading`) and of a Stable Diffusion 1.x/2.x base (the latent
demo family; diffusers' ``load_lora_into_unet``/``_text_encoder``, as ``cgidm check`` attaches
them). Every other model (full fine-tunes, LoRAs of other families) is loaded by the caller's
own loader (``fallback``), exactly as before. Only one base is kept loaded: the audit runs its
models base by base (:func:`cgidm_core.audit_run.run_audit` groups them), so a second base
replaces the first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .audit import AuditModel
from .names import DDPM_FAMILY, PIXEL_FLOW_FAMILY, SD_FAMILY
from .pair import ModelPair

#: (pretrained path, fine-tuned path) of an audit model, resolved as the caller resolves them;
#: None for a model that has no local files to attach (the fallback loader takes it).
PathResolver = Callable[[AuditModel], tuple[Path, Path] | None]
SWAPPED_FAMILIES = (DDPM_FAMILY, PIXEL_FLOW_FAMILY, SD_FAMILY)


@dataclass
class SwapStats:
    """What the loader did, for the benchmark and the audit's log."""

    base_loads: int = 0
    swaps: int = 0
    fallback_loads: int = 0
    seconds_loading_bases: float = 0.0
    seconds_attaching: float = 0.0
    bases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in vars(self).items()}


class _LoadedBase:
    """A base kept loaded: attach a LoRA and get its pair; detach to restore the base."""

    def attach(self, lora: Path) -> ModelPair:
        raise NotImplementedError

    def detach(self) -> None:
        raise NotImplementedError


class _PixelBase(_LoadedBase):
    def __init__(self, folder: Path, family: str, opts: Any):
        from .models.components import place
        from .models.pixel_loading import _ddpm_schedule, _flow_schedule, _load_ddpm_unet

        self.family, self.opts = family, opts
        self.unet = place(_load_ddpm_unet(folder, opts), opts)
        self.ddpm = _ddpm_schedule(folder) if family == DDPM_FAMILY else None
        self.flow = _flow_schedule(folder) if family == PIXEL_FLOW_FAMILY else None

    def attach(self, lora: Path) -> ModelPair:
        from .models.pixel_loading import ddpm_lora_pair, pixel_flow_lora_pair

        if self.ddpm is not None:
            alphas, prediction = self.ddpm
            return ddpm_lora_pair(self.unet, lora, alphas, prediction, self.opts)
        assert self.flow is not None
        return pixel_flow_lora_pair(self.unet, lora, self.flow[0], self.opts)

    def detach(self) -> None:
        from .models.pixel_lora_loading import remove_lora_layers

        remove_lora_layers(self.unet)


class _StableDiffusionBase(_LoadedBase):
    def __init__(self, folder: Path, opts: Any):
        from .models.components import place
        from .models.sd_loading import load_sd_base

        self.opts = opts
        self.base = load_sd_base(folder, opts)
        self.vae = place(self.base.vae, opts, torch.float32)
        self.base.unet = place(self.base.unet, opts)
        self.base.text_encoder = place(self.base.text_encoder, opts)

    def attach(self, lora: Path) -> ModelPair:
        from .models.components import place
        from .models.loading import _read_instance_prompt
        from .models.sd_loading import attach_lora
        from .models.stable_diffusion import StableDiffusionLoraPair

        base, opts = self.base, self.opts
        try:
            attach_lora(lora, base, opts)
        except BaseException:
            self.detach()
            raise
        # the text encoders stay loaded: the next LoRA's pair shares them
        pair = StableDiffusionLoraPair(
            unet=place(base.unet, opts), text_encoder=place(base.text_encoder, opts),
            vae=self.vae, tokenizer=base.tokenizer, alphas_cumprod=base.alphas_cumprod,
            prediction_type=base.prediction_type, device=opts.device, dtype=opts.dtype,
            keep_text_encoders=True)
        _read_instance_prompt(pair, lora, "lora")
        return pair

    def detach(self) -> None:
        from .models.pixel_lora_loading import remove_lora_layers

        remove_lora_layers(self.base.unet)
        remove_lora_layers(self.base.text_encoder)


class BaseSlot:
    """Where the one loaded base lives. A loader makes its own; a worker process keeps one for
    all its audit subtasks (``worker/audit_swap.py``), so consecutive subtasks of one base,
    routed to it by that base, find it loaded."""

    def __init__(self) -> None:
        self.loaded: tuple[tuple[Path, str], _LoadedBase] | None = None


class LoraSwapLoader:
    """An audit's pair loader that keeps one base loaded and swaps LoRAs of it in and out.

    ``open(model)`` is a context manager giving the model's pair: a LoRA of the loaded base
    (loaded now if it is another base) with its adapter attached, removed on exit; any other
    model comes from ``fallback(model)``. Calling the loader itself (``load(model)``) gives a
    pair that owns its networks, for callers that keep pairs (it is ``fallback``)."""

    def __init__(self, fallback: Callable[[AuditModel], ModelPair], resolve: PathResolver, *,
                 device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, allow_network: bool = False,
                 slot: BaseSlot | None = None):
        self.fallback = fallback
        self.resolve = resolve
        self.device, self.dtype, self.allow_network = device, dtype, allow_network
        self.stats = SwapStats()
        self.slot = slot or BaseSlot()

    def __call__(self, model: AuditModel) -> ModelPair:
        return self.fallback(model)

    def swappable(self, pre: Path, ft: Path) -> str | None:
        """The base's family when ``ft`` is a LoRA file this loader attaches to ``pre``."""
        from .models.formats import check_finetune_family, detect_finetuned_kind, pipeline_entry

        if not (pre.is_dir() and (pre / "model_index.json").is_file()):
            return None
        family = pipeline_entry(pre)
        if family.name not in SWAPPED_FAMILIES or detect_finetuned_kind(ft) != "lora":
            return None
        check_finetune_family(family, "lora", ft)  # a LoRA of another family: its own error
        return family.name

    def _base(self, pre: Path, family: str) -> _LoadedBase:
        import time

        from . import families
        from .models.adapter import LoadOptions
        from .models.devices import resolve_device, resolve_dtype
        from .models.loading import _default_dtype

        key = (pre, f"{self.device}/{self.dtype}")
        if self.slot.loaded is not None and self.slot.loaded[0] == key:
            return self.slot.loaded[1]
        self.slot.loaded = None  # the previous base goes before the next one loads
        started = time.perf_counter()
        target = resolve_device(self.device)
        opts = LoadOptions(device=target,
                           dtype=resolve_dtype(_default_dtype(families.get(family), self.dtype,
                                                              target), target),
                           local_files_only=not self.allow_network)
        base = (_StableDiffusionBase(pre, opts) if family == SD_FAMILY
                else _PixelBase(pre, family, opts))
        self.slot.loaded = (key, base)
        self.stats.base_loads += 1
        self.stats.bases.append(str(pre))
        self.stats.seconds_loading_bases += time.perf_counter() - started
        return base

    @contextmanager
    def open(self, model: AuditModel) -> Iterator[ModelPair]:
        import time

        try:
            paths = self.resolve(model)
            family = None if paths is None else self.swappable(Path(paths[0]), Path(paths[1]))
        except Exception:  # noqa: BLE001 - the fallback loader raises the error a check would
            paths = family = None
        if paths is None or family is None:
            self.stats.fallback_loads += 1
            pair = self.fallback(model)
            yield pair
            return
        pre, ft = paths
        base = self._base(Path(pre), family)
        started = time.perf_counter()
        pair = base.attach(Path(ft))
        self.stats.swaps += 1
        self.stats.seconds_attaching += time.perf_counter() - started
        try:
            yield pair
        finally:
            base.detach()

    def release(self) -> None:
        """Drop the loaded base (its memory goes with the last reference)."""
        self.slot.loaded = None


def local_paths(model: AuditModel) -> tuple[Path, Path]:
    """Both references of ``model`` as local paths (demo names, files, folders): the resolver
    of the command line and the benchmark (hub references are fetched by ``cgidm audit``
    before this is asked)."""
    from .demo import resolve_model_reference

    return (resolve_model_reference(model.pretrained), resolve_model_reference(model.finetuned))


__all__ = ["BaseSlot", "LoraSwapLoader", "SwapStats", "local_paths", "SWAPPED_FAMILIES"]
