"""Audits: one portfolio of images against many suspect models, with error control across models.

Why a module of its own: testing N models one by one at level 5 % makes about N/20 false
accusations. An audit gives every model one set-level p-value (the one-sided Mann-Whitney test of
its images against the controls, :func:`cgidm_core.stats.controls_test`), then decides over all
models at once, controlling the false discovery rate (Benjamini-Hochberg, the default) or the
family-wise error rate (Holm; Bonferroni). The CLI (``cgidm audit``), the service's audit job and
the benchmark all decide through :func:`decide_models`, so the promise is the same everywhere.

Two tiers (:func:`needs_full_verdict`): every model first gets a cheap *screen*, the part of the
verdict that needs no inversion (the loss attack and the contrast at the original, 19 model
evaluations per image instead of about 619), fused as z(loss) + z(contrast) over images and
controls together and tested like the full verdict. A model whose screen p-value is above
:data:`SCREEN_CLEAR_P` is *cleared*: it never gets the inversion, and its audit p-value is 1. Only
the others get the full CGI-DM verdict, whose p-value is the audit p-value.

Why p = 1 for a cleared model, not its screen p-value: then a model can only be flagged through its
full verdict, and ``P(audit p <= a) <= P(full p <= a) <= a`` for every level a, so each audit
p-value stays valid and BH/Holm keep their guarantee (a screen can only make an audit miss a
member, never accuse a non-member). The screen p-value is reported next to it.

This module imports no torch, and numpy/scipy only inside the functions that compute: the
gateway image (which has neither) validates model lists with :func:`parse_models`. Running the
tiers on real models is :mod:`cgidm_core.audit_run`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigError

#: Multiple-testing corrections across models: "bh" (false discovery rate, Benjamini-Hochberg,
#: the default), "holm" and "bonferroni" (family-wise error rate).
CORRECTIONS: tuple[str, ...] = ("bh", "holm", "bonferroni")
DEFAULT_CORRECTION = "bh"
#: What each correction controls, written into every audit document.
CORRECTION_DESCRIPTIONS: dict[str, str] = {
    "bh": "false discovery rate (Benjamini-Hochberg): among the flagged models, the expected "
          "share of models not trained on the images is at most the level",
    "holm": "family-wise error rate (Holm): the chance of flagging even one model not trained "
            "on the images is at most the level",
    "bonferroni": "family-wise error rate (Bonferroni): the chance of flagging even one model "
                  "not trained on the images is at most the level",
}
DEFAULT_LEVEL = 0.05
#: A model whose screen p-value is above this is cleared without the inversion. Measured on the
#: demo family (docs/AUDITS.md, benchmarks/audit.py): the member models screened at 5.4e-6 to
#: 0.045 (the latent LoRA pair 0.001, the flow pair 5.4e-6), the 12 non-member models of the same
#: base at 0.315 to 0.876. 0.2 was set before that measurement and falls between them, 4x above
#: the weakest member (a member cleared here is a miss the full verdict can never repair).
#: Measured on one family, not on the benchmark suite.
SCREEN_CLEAR_P = 0.2
#: The per-image values the screen fuses (``attack_scores`` names, all "higher = member").
SCREEN_ATTACKS: tuple[str, ...] = ("loss", "contrast")
#: Most models one audit may hold (the service and the CLI refuse more).
MAX_AUDIT_MODELS = 500

TIER_SCREEN = "screen"
TIER_FULL = "full"
#: A model that could not be tested (its files missing or unreadable, the wrong family, a
#: failure while it ran): recorded with its error, never ranked, flagged or counted in the
#: correction across models (see :func:`decide_models`).
TIER_ERROR = "error"
#: The note every failed model carries in an audit document.
ERROR_NOTE = ("not tested: this model failed (see error), so it has no p-value; it is left out "
              "of the ranking and of the correction across models, and the error level holds "
              "for the models that were tested. Fix the reference and audit it again.")


@dataclass(frozen=True)
class AuditModel:
    """One suspect of an audit: its base, the model itself as the caller named it, a prompt."""

    pretrained: str
    finetuned: str
    prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def group_key(self) -> tuple[str, str | None]:
        """Models that share this key share the base's passes (same base, same prompt)."""
        return (self.pretrained, self.prompt)


def parse_models(raw: Any, *, max_models: int = MAX_AUDIT_MODELS) -> list[AuditModel]:
    """Validate an audit's model list: a JSON list of ``{"pretrained", "finetuned", "prompt"?}``.

    Raises :class:`ConfigError` naming the first bad entry (its index and field), so a CLI user and
    an API caller both learn exactly what to fix.
    """
    if not isinstance(raw, list):
        raise ConfigError("the model list must be a JSON list of objects "
                          '{"pretrained": REF, "finetuned": REF, "prompt": optional}')
    if not raw:
        raise ConfigError("the model list is empty; name at least one suspect model")
    if len(raw) > max_models:
        raise ConfigError(f"the model list has {len(raw)} models; at most {max_models} per audit "
                          "(split it into several audits)")
    out: list[AuditModel] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"models[{i}] must be an object with 'pretrained' and 'finetuned'")
        unknown = set(entry) - {"pretrained", "finetuned", "prompt"}
        if unknown:
            raise ConfigError(f"models[{i}] has unknown field(s) {sorted(unknown)}; allowed: "
                              "pretrained, finetuned, prompt")
        for field in ("pretrained", "finetuned"):
            value = entry.get(field)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"models[{i}].{field} must be a non-empty string (a model "
                                  "reference as for `cgidm check`)")
        prompt = entry.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ConfigError(f"models[{i}].prompt must be a string or left out")
        out.append(AuditModel(entry["pretrained"].strip(), entry["finetuned"].strip(), prompt))
    return out


def check_level(level: float) -> float:
    """The error level of an audit, strictly between 0 and 1."""
    if not isinstance(level, int | float) or not 0.0 < float(level) < 1.0:
        raise ConfigError(f"the error level (--fdr) must be strictly between 0 and 1, got {level}")
    return float(level)


def check_correction(correction: str) -> str:
    if correction not in CORRECTIONS:
        raise ConfigError(f"unknown correction {correction!r}; choose from "
                          f"{', '.join(CORRECTIONS)}")
    return correction


def adjust_p_values(p_values: Sequence[float], correction: str = DEFAULT_CORRECTION
                    ) -> list[float]:
    """Adjusted p-values across models: BH q-values (scipy's ``false_discovery_control``) or
    Holm/Bonferroni adjusted p-values (statsmodels' ``multipletests``). A model is flagged at
    level ``a`` exactly when its adjusted value is at most ``a``."""
    import numpy as np

    check_correction(correction)
    p = np.asarray(p_values, dtype=float).reshape(-1)
    if p.size == 0:
        return []
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ConfigError("p-values must be finite numbers in [0, 1]")
    if correction == "bh":
        from scipy.stats import false_discovery_control

        return [float(v) for v in false_discovery_control(p, method="bh")]
    from statsmodels.stats.multitest import multipletests

    return [float(v) for v in multipletests(p, method=correction)[1]]


def screen_scores(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """The screen's score of each record (suspects and controls together): the sum of the
    z-scores of :data:`SCREEN_ATTACKS`, standardised over exactly these records (as the verdict's
    fused score is, :mod:`cgidm_core.evidence`). A constant value (a model identical to its base
    has contrast 0 everywhere) contributes nothing."""
    import numpy as np

    total = np.zeros(len(records))
    for name in SCREEN_ATTACKS:
        values = []
        for r in records:
            value = (r.get("attack_scores") or {}).get(name)
            if value is None or not math.isfinite(float(value)):
                raise ConfigError(f"image {r.get('name')!r} has no finite {name!r} score; the "
                                  "screen needs the loss and contrast scores of every image")
            values.append(float(value))
        arr = np.asarray(values)
        std = arr.std()
        if arr.size > 1 and std > 0 and np.isfinite(std):
            total += (arr - arr.mean()) / std
    return [float(v) for v in total]


def screen_test(images: Sequence[Mapping[str, Any]], controls: Sequence[Mapping[str, Any]],
                alpha: float = DEFAULT_LEVEL) -> dict[str, Any]:
    """The screen of one model: its images' screen scores against the controls', by the same
    Mann-Whitney test as the full verdict. Returns ``{"p_value", "auc", "scores",
    "control_scores"}``."""
    from .stats import controls_test

    if not controls:
        raise ConfigError("an audit needs known non-member controls (--controls): they are the "
                          "null every model's p-value is measured against")
    scores = screen_scores([*images, *controls])
    test = controls_test(scores[: len(images)], scores[len(images):], alpha=alpha)
    return {"p_value": test.p_value, "auc": test.auc, "scores": scores[: len(images)],
            "control_scores": scores[len(images):]}


def needs_full_verdict(screen_p_value: float, clear_p: float = SCREEN_CLEAR_P) -> bool:
    """True when the screen cannot clear the model: its screen p-value is at most ``clear_p``."""
    return float(screen_p_value) <= clear_p


def failed_entry(index: int, model: AuditModel, exc: BaseException) -> dict[str, Any]:
    """The entry of a model that could not be tested: its reference, the error's code and
    message (what the user must fix), no p-value. The CLI and the service record it the same
    way and go on with the other models."""
    code = getattr(exc, "code", None) or type(exc).__name__
    return {"index": index, **model.to_dict(), "tier": TIER_ERROR,
            "error": {"code": str(code), "message": str(exc)}, "p_value": None,
            "screen_p_value": None, "cleared_by_screen": False}


def decide_models(entries: Sequence[Mapping[str, Any]], *, level: float = DEFAULT_LEVEL,
                  correction: str = DEFAULT_CORRECTION) -> list[dict[str, Any]]:
    """Rank the models of an audit and decide over all of them.

    ``entries`` are per-model dicts with ``p_value`` (the audit p-value: the full verdict's, 1 for
    a cleared model) and optionally ``screen_p_value`` and ``auc``. Returns copies, ranked: by
    p-value, then screen p-value, then AUC (higher first), then input order; each gains
    ``rank`` (1 = strongest evidence), ``q_value`` (the adjusted p-value of ``correction``) and
    ``flagged`` (``q_value <= level``).

    Models that failed (``tier`` ``"error"``, :func:`failed_entry`) come after the ranked ones
    with ``rank``, ``p_value`` and ``q_value`` None, ``flagged`` False and :data:`ERROR_NOTE`:
    they are not in the family the correction runs over. Why not p = 1 inside the family: an
    untested model would then raise every other model's q-value (BH and Holm grow with the
    family's size) for no evidence at all, and a p-value it never had would be reported.
    """
    level = check_level(level)
    check_correction(correction)
    models = [dict(e) for e in entries]
    for i, model in enumerate(models):
        model.setdefault("index", i)
    tested = [m for m in models if m.get("tier") != TIER_ERROR]
    failed = [m for m in models if m.get("tier") == TIER_ERROR]
    adjusted = adjust_p_values([float(m["p_value"]) for m in tested], correction)
    for model, q in zip(tested, adjusted, strict=True):
        model["q_value"] = q
        model["flagged"] = bool(q <= level)

    def key(m: Mapping[str, Any]) -> tuple[float, float, float, int]:
        screen = m.get("screen_p_value")
        auc = m.get("auc")
        return (float(m["p_value"]), 1.0 if screen is None else float(screen),
                -(0.0 if auc is None else float(auc)), int(m["index"]))

    tested.sort(key=key)
    for rank, model in enumerate(tested, start=1):
        model["rank"] = rank
    for model in sorted(failed, key=lambda m: int(m["index"])):
        model.update(rank=None, p_value=None, q_value=None, flagged=False, note=ERROR_NOTE)
        tested.append(model)
    return tested


def decision_settings(level: float, correction: str, clear_p: float) -> dict[str, Any]:
    """What an audit's decisions rest on: the ``decision`` entry of every audit document."""
    return {
        "level": level,
        "correction": correction,
        "controls": CORRECTION_DESCRIPTIONS[correction],
        "screen": {
            "attacks": list(SCREEN_ATTACKS),
            "clear_p": clear_p,
            "rule": f"a model whose screen p-value (z(loss) + z(contrast), Mann-Whitney against "
                    f"the controls) is above {clear_p:g} is cleared without the inversion; its "
                    "audit p-value is 1",
        },
    }
