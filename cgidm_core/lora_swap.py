"""LoRAs of one base swapped in and out of one loaded base, for audits.

Why: an audit of a hub's LoRAs of one base would otherwise load the base once per model (a
LoRA pair is the base plus a few MB of adapter). :class:`LoraSwapLoader` keeps the base loaded
and, for each LoRA model, attaches the LoRA as a peft adapter, hands the pair to the audit, and
removes the adapter when the model is done, which puts the base's own modules back (peft never
modifies them: the base computes bit for bit what it computed before; tests check it).

Which models swap: a LoRA file of a base whose family adapter (:mod:`cgidm_core.families`)
defines ``load_lora_base`` (:class:`~cgidm_core.models.adapter.LoraBase`). This module names no
family: how a LoRA attaches is the adapter's, and the adapter builds a swapped pair with the
same function its ``load_pair`` uses for a LoRA (diffusers' own LoRA loader of the family,
``load_lora_into_unet``/``_transformer``/``_text_encoder`` with the adapter name ``cgidm check``
uses), so a swapped pair is the pair ``cgidm check`` loads and scores the same, float for float.
At present every family with LoRA support has one: the pixel families (DDPM, flow matching),
Stable Diffusion 1.x/2.x, SDXL (and its Pony/Illustrious descendants, which are SDXL
pipelines), Flux.1, SD 3.x, and the diffusion-transformer families of
:mod:`cgidm_core.models.transformer_adapter` (Flux.2, Qwen-Image, Z-Image, Chroma). Removing
the adapter is generic: diffusers' ``recurse_remove_peft_layers`` (what ``unload_lora`` does)
on every network the adapter says a LoRA attaches to.

Every other model (full fine-tunes, a base given as one file, LoRAs of a family without
``load_lora_base``) is loaded by the caller's own loader (``fallback``), exactly as before. Only
one base is kept loaded: the audit runs its models base by base
(:func:`cgidm_core.audit_run.run_audit` groups them), so a second base replaces the first.

Memory: a :class:`BaseSlot` may be given a budget (:class:`SlotBudget`; the worker gives its
pair cache, ``worker/model_cache.py``): the kept base then counts in that budget, evicting pairs
to make room and evicted in turn like a pair; a base larger than the whole budget is not kept
and its LoRAs are loaded as pairs, one per model, through ``fallback`` (logged once per base).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .audit import AuditModel
from .pair import ModelPair

if TYPE_CHECKING:
    from .families import Family
    from .models.adapter import LoraBase

log = logging.getLogger("cgidm.lora_swap")

#: (pretrained path, fine-tuned path) of an audit model, resolved as the caller resolves them;
#: None for a model that has no local files to attach (the fallback loader takes it).
PathResolver = Callable[[AuditModel], tuple[Path, Path] | None]
#: (pretrained folder, "device/dtype"): which base a slot holds.
BaseKey = tuple[Path, str]


def swapped_families() -> tuple[str, ...]:
    """The families whose LoRAs are swapped: those whose adapter defines ``load_lora_base``."""
    from . import families

    return tuple(f.name for f in families.FAMILIES
                 if hasattr(families.adapter(f), "load_lora_base"))


@dataclass
class SwapStats:
    """What the loader did, for the benchmark and the audit's log."""

    base_loads: int = 0
    swaps: int = 0
    fallback_loads: int = 0
    seconds_loading_bases: float = 0.0
    seconds_attaching: float = 0.0
    bases: list[str] = field(default_factory=list)
    #: Bases loaded but not kept: larger than the slot's budget (their LoRAs fell back).
    bases_not_kept: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in vars(self).items()}


class SlotBudget(Protocol):
    """A memory budget the slot's base counts in (``worker.model_cache.ModelCache``)."""

    budget_bytes: int

    def hold(self, key: Hashable, value: Any, size: int, release: Callable[[], None]) -> bool:
        """Count ``size`` bytes for ``key`` in the budget, evicting to make room; ``release``
        is called if it is evicted later. False (nothing held) when it cannot fit at all."""

    def touch(self, key: Hashable) -> None:
        """``key`` was just used (least recently used goes first)."""

    def drop(self, key: Hashable) -> None:
        """Forget ``key`` (its owner let it go)."""


class BaseSlot:
    """Where the one loaded base lives. A loader makes its own; a worker process keeps one for
    all its audit subtasks (``worker/audit_swap.py``), so consecutive subtasks of one base,
    routed to it by that base, find it loaded. With a ``budget`` the base counts in it."""

    def __init__(self, budget: SlotBudget | None = None) -> None:
        self.loaded: tuple[BaseKey, LoraBase] | None = None
        self.budget = budget
        #: Bases found larger than the budget, with their size: their LoRAs load as pairs.
        self.too_large: dict[BaseKey, int] = {}

    def get(self, key: BaseKey) -> LoraBase | None:
        if self.loaded is not None and self.loaded[0] == key:
            if self.budget is not None:
                self.budget.touch(("lora-swap-base", *key))
            return self.loaded[1]
        return None

    def clear(self) -> None:
        """Let the kept base go (its memory goes with the last reference)."""
        if self.loaded is not None and self.budget is not None:
            self.budget.drop(("lora-swap-base", *self.loaded[0]))
        self.loaded = None

    def keep(self, key: BaseKey, base: LoraBase) -> bool:
        """Keep ``base``; False (and not kept) when it is larger than the whole budget."""
        self.clear()
        if self.budget is not None:
            size = base.resident_bytes()

            def evicted() -> None:
                if self.loaded is not None and self.loaded[0] == key:
                    self.loaded = None

            if not self.budget.hold(("lora-swap-base", *key), base, size, evicted):
                self.too_large[key] = size
                log.warning(
                    "the base %s (%.2f GB loaded) is larger than the worker's model cache "
                    "budget (%.2f GB, CGIDM_MODEL_CACHE_BYTES): it is not kept loaded, its "
                    "LoRAs are loaded as pairs one model at a time; raise the budget to swap "
                    "them", key[0], size / 1e9, self.budget.budget_bytes / 1e9)
                return False
        self.loaded = (key, base)
        return True


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

    def swappable(self, pre: Path, ft: Path) -> Family | None:
        """The base's family when ``ft`` is a LoRA file this loader attaches to ``pre`` (a
        pipeline folder of a family whose adapter has ``load_lora_base``)."""
        from . import families
        from .models.formats import check_finetune_family, detect_finetuned_kind, pipeline_entry

        if not (pre.is_dir() and (pre / "model_index.json").is_file()):
            return None
        family = pipeline_entry(pre)
        if not hasattr(families.adapter(family), "load_lora_base"):
            return None
        if detect_finetuned_kind(ft) != "lora":
            return None
        check_finetune_family(family, "lora", ft)  # a LoRA of another family: its own error
        return family

    def _key(self, pre: Path) -> BaseKey:
        return (pre, f"{self.device}/{self.dtype}")

    def _base(self, pre: Path, family: Family) -> LoraBase | None:
        """The loaded base of ``pre`` (loaded now if the slot holds another); None when it is
        too large for the slot's budget (its LoRAs then fall back)."""
        import time

        from . import families
        from .models.adapter import BaseRequest, LoadOptions
        from .models.devices import resolve_device, resolve_dtype
        from .models.loading import _default_dtype

        key = self._key(pre)
        loaded = self.slot.get(key)
        if loaded is not None:
            return loaded
        if key in self.slot.too_large:
            return None
        self.slot.clear()  # the previous base goes before the next one loads
        started = time.perf_counter()
        target = resolve_device(self.device)
        opts = LoadOptions(device=target,
                           dtype=resolve_dtype(_default_dtype(family, self.dtype, target),
                                               target),
                           local_files_only=not self.allow_network)
        adapter: Any = families.adapter(family)  # load_lora_base: checked by swappable()
        base: LoraBase = adapter.load_lora_base(BaseRequest(family=family, pretrained=pre,
                                                            opts=opts))
        self.stats.base_loads += 1
        self.stats.bases.append(str(pre))
        self.stats.seconds_loading_bases += time.perf_counter() - started
        if not self.slot.keep(key, base):
            self.stats.bases_not_kept.append(str(pre))
            return None
        return base

    def _attach(self, base: LoraBase, family: Family, lora: Path) -> ModelPair:
        from .models.formats import check_finetune_family
        from .models.loading import _read_instance_prompt

        evidence = check_finetune_family(family, "lora", lora)  # checked by swappable() too
        try:
            pair = base.pair(lora)
            if evidence is not None:  # as load_pair_from_paths records it
                pair.family_evidence = evidence.describe()
            if family.conditioning == "text":  # as load_pair_from_paths reads it
                _read_instance_prompt(pair, lora, "lora")
        except BaseException:
            base.detach()
            raise
        return pair

    @contextmanager
    def open(self, model: AuditModel) -> Iterator[ModelPair]:
        import time

        try:
            paths = self.resolve(model)
            family = None if paths is None else self.swappable(Path(paths[0]), Path(paths[1]))
        except Exception:  # noqa: BLE001 - the fallback loader raises the error a check would
            paths, family = None, None
        base = None if paths is None or family is None else self._base(Path(paths[0]), family)
        if paths is None or family is None or base is None:
            self.stats.fallback_loads += 1
            yield self.fallback(model)
            return
        started = time.perf_counter()
        pair = self._attach(base, family, Path(paths[1]))
        self.stats.swaps += 1
        self.stats.seconds_attaching += time.perf_counter() - started
        try:
            yield pair
        finally:
            base.detach()

    def release(self) -> None:
        """Drop the loaded base (its memory goes with the last reference)."""
        self.slot.clear()


def local_paths(model: AuditModel) -> tuple[Path, Path]:
    """Both references of ``model`` as local paths (demo names, files, folders): the resolver
    of the command line and the benchmark (hub references are fetched by ``cgidm audit``
    before this is asked)."""
    from .demo import resolve_model_reference

    return (resolve_model_reference(model.pretrained), resolve_model_reference(model.finetuned))


__all__ = ["BaseSlot", "LoraSwapLoader", "SlotBudget", "SwapStats", "local_paths",
           "swapped_families"]
