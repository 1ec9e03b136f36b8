"""Running an audit on real models: the screen, the full verdict where needed, shared base passes.

The decisions are :mod:`cgidm_core.audit`'s; this module spends the compute. Callers (``cgidm
audit``, the service's audit subtasks, ``benchmarks/audit.py``) give a ``load(model)`` that turns
one :class:`~cgidm_core.audit.AuditModel` into a loaded :class:`~cgidm_core.pair.ModelPair` (they
resolve references differently: local paths and hub references for the CLI, registry ids and
uploads for the service) and get back one plain dict per model, which they may store as soon as
it is done: a resumed audit hands those back as ``done`` and they are not recomputed.

Shared work: models on one base with one prompt form a group (:attr:`AuditModel.group_key`).
Within a group the base's noise predictions on the screen's noisy images are the same for every
model (the noise is seeded per image, not per model), so they are computed once and memoised
(:class:`BasePasses`): the contrast score's 8 base evaluations per image and control are paid
once per group instead of once per model (a caller that runs one base's models in several calls,
the service's subtasks, hands the same memo back through ``run_audit(base_passes=...)``). The
memo is only used without gradients (the screen); the inversion's base passes depend on the
model's own iterates and cannot be shared.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from .audit import (
    DEFAULT_CORRECTION,
    DEFAULT_LEVEL,
    SCREEN_ATTACKS,
    SCREEN_CLEAR_P,
    TIER_FULL,
    TIER_SCREEN,
    AuditModel,
    needs_full_verdict,
    screen_test,
)
from .errors import Cancelled, ConfigError
from .images import image_seed, to_tensor
from .inversion import InversionConfig
from .pair import ModelPair
from .results import ImageResult

if TYPE_CHECKING:  # annotations only
    from .pair import Conditioning

PairLoader = Callable[[AuditModel], ModelPair]
#: ``base_passes(group_key)``: the memo of base passes a group of :func:`run_audit` uses; a caller
#: that audits one base in several calls (the service's subtasks) gives the same memo back.
BasePassesFor = Callable[[tuple[str, str | None]], "BasePasses"]


@dataclass
class AuditSettings:
    """How an audit is run and decided."""

    level: float = DEFAULT_LEVEL
    correction: str = DEFAULT_CORRECTION
    clear_p: float = SCREEN_CLEAR_P
    inversion: InversionConfig = field(default_factory=InversionConfig)
    batch_size: int | None = None
    #: Run the full verdict on every model, screened or not (the benchmark measures what the
    #: screen would have dropped this way); the screen's decision is still recorded.
    full_for_all: bool = False


class BasePasses:
    """Memoised base-model predictions of one group (one base, one prompt), without gradients.

    Keyed by the bytes of the noisy input and the timesteps: the screen feeds every model of the
    group exactly the same noisy images (per-image seeds), so the second model onwards finds
    them here. ``hits`` and ``misses`` count batches, for the benchmark."""

    def __init__(self) -> None:
        self.memo: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @contextmanager
    def attached(self, pair: ModelPair) -> Iterator[None]:
        """Route ``pair.eps_pretrained`` through this memo while the block runs, when no
        gradient is being taken; the pair is given back unchanged (a worker's cached pair
        serves other jobs afterwards)."""
        original = pair.eps_pretrained

        def eps_pretrained(z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning
                           ) -> torch.Tensor:
            if torch.is_grad_enabled() and z_t.requires_grad:
                return original(z_t, t, cond)
            digest = hashlib.blake2b(z_t.detach().cpu().contiguous().numpy().tobytes(),
                                     digest_size=20)
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
            digest.update(_conditioning_bytes(getattr(cond, "pretrained", None)))
            key = digest.digest()
            found = self.memo.get(key)
            if found is not None:
                self.hits += 1
                return found.to(z_t.device)
            self.misses += 1
            out = original(z_t, t, cond)
            self.memo[key] = out.detach()
            return out

        # wraps this pair instance's method on purpose: the memo answers the repeated calls
        pair.eps_pretrained = eps_pretrained  # type: ignore[method-assign]
        try:
            yield
        finally:
            del pair.eps_pretrained  # the class's method again


def _conditioning_bytes(value: Any) -> bytes:
    """The base's conditioning as bytes for the memo key: two prompts never share passes."""
    if value is None:
        return b"unconditional"
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().contiguous().numpy().tobytes()
    if isinstance(value, tuple | list):
        return b"|".join(_conditioning_bytes(v) for v in value)
    if isinstance(value, dict):
        return b"|".join(k.encode() + b"=" + _conditioning_bytes(v)
                         for k, v in sorted(value.items()))
    return repr(value).encode()


def screen_records(pair: ModelPair, pictures: Sequence[Image.Image], names: Sequence[str],
                   prompt: str | None, *, seed: int, resolution: int | None = None,
                   batch_size: int | None = None) -> list[dict[str, Any]]:
    """The screen's per-image values (``attack_scores``: loss and contrast) of every picture,
    seeded per image exactly as :func:`cgidm_core.api.authenticate` seeds them, so a model that
    goes on to the full verdict keeps these values."""
    from .baselines import BASELINES

    size = pair.run_size(resolution)
    batch = batch_size or pair.batch_size_at(size)
    cond = pair.conditioning(prompt)
    records: list[dict[str, Any]] = []
    for start in range(0, len(pictures), batch):
        chunk = to_tensor(list(pictures[start:start + batch]), size)
        seeds = [image_seed(img, seed) for img in chunk]
        with torch.no_grad():
            z0 = pair.encode(chunk.to(pair.device)).float()
        values = {name: BASELINES[name](pair, z0, cond, seed=seed, seeds=seeds,
                                        batch_size=len(seeds)) for name in SCREEN_ATTACKS}
        for j in range(len(seeds)):
            records.append({"name": names[start + j],
                            "attack_scores": {k: float(v[j]) for k, v in values.items()}})
    return records


@dataclass
class ModelOutcome:
    """One model's part of an audit: the plain ``entry`` (stored, resumed, decided on) and, for a
    model that got the full verdict, the per-image results whose pictures a caller may save."""

    entry: dict[str, Any]
    results: list[ImageResult] = field(default_factory=list)


def audit_model(pair: ModelPair, model: AuditModel, index: int,
                images: Sequence[Image.Image], controls: Sequence[Image.Image],
                image_names: Sequence[str], control_names: Sequence[str],
                settings: AuditSettings, *,
                progress: Callable[[int, int], None] | None = None,
                should_cancel: Callable[[], bool] | None = None) -> ModelOutcome:
    """Screen one model and, unless the screen clears it, run the full verdict."""
    from .api import authenticate
    from .evidence import ATTACK_SCORES, build_evidence
    from .prompts import choose_prompt

    started = time.perf_counter()
    config = settings.inversion
    # one prompt for both tiers: the given one, else the fine-tune's own (its metadata)
    prompt = choose_prompt(model.prompt, pair).text
    records = screen_records(pair, [*images, *controls], [*image_names, *control_names],
                             prompt, seed=config.seed, resolution=config.resolution,
                             batch_size=settings.batch_size)
    n = len(images)
    screen = screen_test(records[:n], records[n:], alpha=settings.level)
    entry: dict[str, Any] = {
        "index": index,
        **model.to_dict(),
        "screen_p_value": screen["p_value"],
        "screen_auc": screen["auc"],
        "screen_seconds": round(time.perf_counter() - started, 3),
    }
    full = needs_full_verdict(screen["p_value"], settings.clear_p)
    entry["cleared_by_screen"] = not full
    images_out = [{**r, "screen_score": s} for r, s in zip(records[:n], screen["scores"],
                                                           strict=True)]
    if not (full or settings.full_for_all):
        entry.update(tier=TIER_SCREEN, p_value=1.0, auc=None, images=images_out,
                     seconds=entry["screen_seconds"])
        return ModelOutcome(entry)

    if should_cancel is not None and should_cancel():
        raise Cancelled("the audit was cancelled")
    # the verdict's cheap scores the screen did not compute (the shared-draw contrast), seeded
    # as the screen's: the full verdict rests on the same score as `cgidm check`'s
    results = authenticate(pair, [*images, *controls], names=[*image_names, *control_names],
                           prompt=prompt, config=config, batch_size=settings.batch_size,
                           progress=progress, should_cancel=should_cancel,
                           attack_scores=tuple(a for a in ATTACK_SCORES
                                               if a not in SCREEN_ATTACKS))
    full_records = []
    for result, screened in zip(results, records, strict=True):
        result.extra["attack_scores"] = {**screened["attack_scores"],
                                         **(result.extra.get("attack_scores") or {})}
        full_records.append(result.to_dict())
    evidence = build_evidence(full_records[:n], full_records[n:], alpha=settings.level)
    test = evidence["set_test"]
    for record, screened in zip(evidence["images"], images_out, strict=True):
        record["screen_score"] = screened["screen_score"]
    entry.update(
        tier=TIER_FULL,
        # a cleared model keeps p = 1 even when the full verdict ran (full_for_all): the audit's
        # decision must not depend on whether the benchmark looked further
        p_value=float(test["p_value"]) if full else 1.0,
        full_p_value=float(test["p_value"]),
        auc=float(test["auc"]),
        evidence=evidence["evidence"],
        images=evidence["images"],
        seconds=round(time.perf_counter() - started, 3),
    )
    return ModelOutcome(entry, list(results[:n]))


@contextmanager
def _opened(load: PairLoader, model: AuditModel) -> Iterator[ModelPair]:
    """The pair of ``model`` for the time it is audited: ``load.open(model)`` where the loader
    has one (:class:`cgidm_core.lora_swap.LoraSwapLoader`: a LoRA is attached to a base kept
    loaded and removed afterwards), else ``load(model)``."""
    opener = getattr(load, "open", None)
    if opener is None:
        yield load(model)
        return
    with opener(model) as pair:
        yield pair


def run_audit(models: Sequence[AuditModel], images: Sequence[Image.Image],
              controls: Sequence[Image.Image], image_names: Sequence[str],
              control_names: Sequence[str], load: PairLoader, settings: AuditSettings, *,
              done: Mapping[int, Mapping[str, Any]] | None = None,
              indices: Sequence[int] | None = None,
              on_model: Callable[[ModelOutcome], None] | None = None,
              progress: Callable[[int, int, int], None] | None = None,
              should_cancel: Callable[[], bool] | None = None,
              stats: dict[str, int] | None = None,
              on_error: Callable[[int, Exception], dict[str, Any] | None] | None = None,
              base_passes: BasePassesFor | None = None,
              ) -> list[dict[str, Any]]:
    """Audit ``models`` (or those at ``indices``), group by group, and return one entry per model
    in input order. ``load`` gives a model's pair; a loader with ``open(model)`` (a context
    manager, :class:`cgidm_core.lora_swap.LoraSwapLoader`) is given the pair back when the model
    is done, so LoRAs of one base are swapped in and out of one loaded base. Models in ``done``
    (index -> entry, from an earlier, interrupted run) are not run again. ``stats`` (if given)
    gains ``base_pass_hits``/``base_pass_misses``: batches of base predictions reused from the
    group's memo or computed. ``on_model(outcome)`` is
    called as each model finishes (store it there); ``progress(index, done, total)`` follows
    the inversion of the model being run. ``on_error(index, exc)`` may turn a model that cannot
    be loaded or fails while it runs (an unreadable file, a prompt too long) into an entry (the
    service records it and goes on with the others); it returns None to let the error end the
    audit (the CLI). ``base_passes(group_key)`` gives each group its memo of base passes
    (default: a new one per group): the service's subtasks, several per base, pass one kept
    across them, so only a worker's first subtask of a base pays the base's screen passes."""
    if not images:
        raise ConfigError("an audit needs at least one image")
    if not controls:
        raise ConfigError("an audit needs known non-member controls: they are the null every "
                          "model's p-value is measured against")
    done = dict(done or {})
    wanted = list(range(len(models))) if indices is None else list(indices)
    groups: dict[tuple[str, str | None], list[int]] = {}
    for i in wanted:
        if i not in done:
            groups.setdefault(models[i].group_key, []).append(i)
    entries: dict[int, dict[str, Any]] = {i: dict(e) for i, e in done.items() if i in wanted}
    for key, members in groups.items():
        shared = BasePasses() if base_passes is None else base_passes(key)
        hits, misses = shared.hits, shared.misses  # a memo given back counts from before
        for i in members:
            if should_cancel is not None and should_cancel():
                raise Cancelled("the audit was cancelled")

            def report(step: int, total: int, index: int = i) -> None:
                if progress is not None:
                    progress(index, step, total)

            try:  # a model that cannot be loaded and one that fails while it runs: the same
                with _opened(load, models[i]) as pair, shared.attached(pair):
                    outcome = audit_model(pair, models[i], i, images, controls, image_names,
                                          control_names, settings, progress=report,
                                          should_cancel=should_cancel)
            except Cancelled:
                raise
            except Exception as exc:
                failed = None if on_error is None else on_error(i, exc)
                if failed is None:
                    raise
                entries[i] = failed
                continue
            entries[i] = outcome.entry
            if on_model is not None:
                on_model(outcome)
        if stats is not None:
            stats["base_pass_hits"] = stats.get("base_pass_hits", 0) + shared.hits - hits
            stats["base_pass_misses"] = (stats.get("base_pass_misses", 0) + shared.misses
                                         - misses)
    return [entries[i] for i in sorted(entries)]
