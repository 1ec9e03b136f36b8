"""What a finished job's evidence says, in plain words: one place for the verdict wording.

The worker's verdicts are ``member_evidence`` (p <= alpha) and ``no_evidence``. A verdict the
controls cannot support is shown as ``inconclusive``: with no controls there is no p-value at
all, and with fewer than ``1/alpha - 1`` controls even an image recovered better than every
control has p = 1/(n+1) > alpha, so "no evidence" would be a claim the data cannot make. The
same holds for the set-level test when there are too few images and controls for its smallest
possible p-value to reach alpha.

Nothing here imports torch: the gateway renders these for the page and the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cgidm.jobs import BASE_RECOVERED, JobRecord, JobResult
from cgidm_core.inversion_config import InversionConfig
from cgidm_core.names import DEFAULT_METRIC, INCONCLUSIVE, NO_EVIDENCE
from cgidm_core.names import MEMBER_EVIDENCE as MEMBER

#: Display verdicts (``data-verdict`` on each result card): the library's verdicts
#: (``cgidm_core.names``) and the page's own for a control image.
CONTROL = "control"

HEADLINES = {
    MEMBER: "Evidence of training",
    NO_EVIDENCE: "No evidence",
    INCONCLUSIVE: "Inconclusive",
    CONTROL: "Control (never published)",
}

_DEFAULTS = InversionConfig()
#: Library defaults the new-check form shows, read from the torch-free
#: ``cgidm_core.inversion_config.InversionConfig`` and ``cgidm_core.names`` (never copied);
#: a default that depends on the model is said in words.
SHOWN_DEFAULTS: dict[str, Any] = {
    "metric": DEFAULT_METRIC,
    "steps": _DEFAULTS.steps,
    "alpha": _DEFAULTS.alpha,
    "epsilon": _DEFAULTS.epsilon,
    "t_min": _DEFAULTS.t_min,
    "t_max": "last timestep - 1" if _DEFAULTS.t_max is None else _DEFAULTS.t_max,
    "mc_samples": _DEFAULTS.mc_samples,
    "seed": _DEFAULTS.seed,
    "batch_size": "as the pair prefers",
    "cell": "by image size" if _DEFAULTS.cell is None else _DEFAULTS.cell,
    "common_random_numbers": _DEFAULTS.common_random_numbers,
    "reencode_partial": _DEFAULTS.reencode_partial,
}


@dataclass
class Picture:
    kind: str
    label: str
    url: str
    alt: str


@dataclass
class Card:
    name: str
    role: str
    score: float
    p_value: float | None
    verdict: str
    headline: str
    detail: str
    pictures: list[Picture]
    metrics: dict[str, float] = field(default_factory=dict)
    #: The number the p-value rests on (the fused evidence), when there were controls.
    evidence_score: float | None = None
    #: the image's own C2PA Content Credentials (cgidm/content_credentials.py), when it has any
    credentials: dict[str, Any] | None = None
    #: the base model's own recovery's similarity to the original (cgidm_core.base_recovery),
    #: when it was computed: shown beside the suspect's recovery, never part of the verdict
    base_metrics: dict[str, float] | None = None


@dataclass
class PlotPoint:
    name: str
    score: float
    x: float
    y: float
    verdict: str


@dataclass
class Plot:
    width: int
    height: int
    points: list[PlotPoint]
    ticks: list[tuple[float, str]]
    rows: list[tuple[float, str]]
    axis_y: float
    left: float
    right: float
    label: str
    metric: str
    #: What the axis shows: "evidence score" with controls, else the similarity metric.
    axis: str = ""


@dataclass
class Evidence:
    job_id: str
    pretrained: str
    finetuned: str
    metric: str
    cards: list[Card]
    control_cards: list[Card]
    summary: str
    set_sentence: str
    set_verdict: str
    plot: Plot | None
    settings: dict[str, Any]
    provenance: dict[str, Any]
    counts: dict[str, int]
    #: One sentence saying which score the plot and the cards' first number show.
    score_sentence: str = ""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p < 0.01 else f"{p:.3f}".rstrip("0").rstrip(".")


def controls_needed(alpha: float) -> int:
    """Fewest controls with which one image can reach p <= alpha: 1/(n+1) <= alpha."""
    return max(1, math.ceil(1.0 / alpha - 1e-9) - 1)


def _image_card_words(score: float, p_value: float | None, verdict: str | None,
                      control_scores: list[float], alpha: float) -> tuple[str, str]:
    n = len(control_scores)
    if n == 0:
        return INCONCLUSIVE, ("No controls were given, so there is nothing to compare this score "
                              "with. Add images of yours that were never published to get a "
                              "verdict.")
    beaten = sum(1 for c in control_scores if c < score)
    if beaten == n:
        compared = f"Recovered better than all {n} of your controls"
    elif beaten == 0:
        compared = f"Recovered no better than any of your {n} controls"
    else:
        compared = f"Recovered better than {beaten} of your {n} controls"
    p_text = f" (p = {_fmt_p(p_value)})" if p_value is not None else ""
    min_p = 1.0 / (n + 1)
    if min_p > alpha + 1e-12:
        need = controls_needed(alpha)
        return INCONCLUSIVE, (f"{compared}{p_text}, but only {_plural(n, 'control')}: too few to "
                              f"reach significance (at least {need} are needed for "
                              f"p \u2264 {alpha:g}).")
    if verdict not in (MEMBER, NO_EVIDENCE, None):  # e.g. a worker that says inconclusive itself
        return INCONCLUSIVE, (f"{compared}{p_text}; the service could not reach a verdict "
                              f"({verdict.replace('_', ' ')}).")
    if verdict == MEMBER or (verdict is None and p_value is not None and p_value <= alpha):
        return MEMBER, (f"{compared}{p_text}: significant at \u03b1 = {alpha:g}. This is evidence "
                        "that the suspect model was trained on this image.")
    return NO_EVIDENCE, (f"{compared}{p_text}: not distinguishable from images the model never "
                         "saw. That is not proof that it was not trained on it.")


def _set_words(result: JobResult, alpha: float) -> tuple[str, str]:
    test = result.controls_test
    if test is None:
        return INCONCLUSIVE, ("No controls were given, so the set as a whole cannot be tested; "
                              f"add at least {controls_needed(alpha)} images of yours that were "
                              "never published.")
    n1, n0 = test.n_suspect, test.n_controls
    pairs = f"{round(test.auc * 100)}% of image\u2013control pairs"
    head = (f"Taken together, your {_plural(n1, 'image')} were recovered better than your "
            f"{_plural(n0, 'control')} in {pairs} (one-sided Mann\u2013Whitney U test, "
            f"p = {_fmt_p(test.p_value)})")
    smallest = 1.0 / math.comb(n1 + n0, n1)  # every image above every control, no ties
    if test.p_value <= test.alpha:
        return MEMBER, (f"{head}: significant at \u03b1 = {test.alpha:g}, evidence that the "
                        "suspect model was trained on this set.")
    if smallest > test.alpha:
        return INCONCLUSIVE, (f"{head}. With this few images and controls the test cannot reach "
                              f"significance at \u03b1 = {test.alpha:g} whatever the scores: "
                              "inconclusive; add controls.")
    return NO_EVIDENCE, (f"{head}: not significant at \u03b1 = {test.alpha:g}, no evidence from "
                         "the set as a whole.")


def _verdict_score(item: Any) -> float:
    """The number an image's verdict was computed from: its ``evidence_score`` when the result
    has one (the fused evidence, cgidm_core.evidence), else its similarity ``score``. The
    sentence "recovered better than n of your controls", the dot plot and each card's first
    number use it, so that what the page shows agrees with the p-value."""
    value = getattr(item, "evidence_score", None)
    score: float = item.score if value is None else value
    return score


def _has_evidence_score(result: JobResult) -> bool:
    return any(getattr(i, "evidence_score", None) is not None
               for i in [*result.images, *result.controls])


def score_sentence(result: JobResult) -> str:
    """Which score the page shows, in words (the plot's axis and the cards' first number)."""
    if _has_evidence_score(result):
        description = (result.evidence or {}).get("description")
        what = f" ({description})" if description else ""
        return ("The score shown is the evidence score the p-values and verdicts rest on"
                f"{what}; higher means more like an image the model was trained on. The "
                f"{result.metric} similarity between your original and what the suspect model "
                "recovered is shown beside it on each card.")
    return (f"The score shown is the {result.metric} similarity between your original and what "
            "the suspect model recovered (higher: recovered better). With no controls there is "
            "no evidence score: the verdict's score is standardised over your images and "
            "controls together.")


def _plot(result: JobResult, cards: list[Card], controls: list[Card]) -> Plot | None:
    everything = cards + controls
    if not everything:
        return None
    width, height, left, right = 640, 150, 110.0, 620.0
    fused = _has_evidence_score(result)

    def shown(card: Card) -> float:
        return card.evidence_score if card.evidence_score is not None else card.score

    scores = [shown(c) for c in everything]
    low, high = min(scores), max(scores)
    pad = (high - low) * 0.08 or abs(high) * 0.05 or 0.05
    low, high = low - pad, high + pad

    def x_of(value: float) -> float:
        return round(left + (value - low) / (high - low) * (right - left), 1)

    rows = [(20.0, "Your images"), (65.0, "Controls")] if controls else [(40.0, "Your images")]
    points = [PlotPoint(c.name, shown(c), x_of(shown(c)), rows[0][0], c.verdict) for c in cards]
    if controls:
        points += [PlotPoint(c.name, shown(c), x_of(shown(c)), rows[1][0], CONTROL)
                   for c in controls]
    ticks = []
    for i in range(5):
        value = low + (high - low) * i / 4
        ticks.append((x_of(value), f"{value:.3g}"))
    axis = "evidence score" if fused else f"{result.metric} similarity"
    meaning = "higher means more member-like" if fused else "higher means recovered better"
    label = (f"Scores ({axis} the p-values rest on, {meaning}) of " if fused else
             f"Scores ({axis}, {meaning}; no evidence score without controls) of ") + \
        _plural(len(cards), 'image') + \
        (f" and {_plural(len(controls), 'control')}" if controls else "")
    return Plot(width, height, points, ticks, rows, 100.0, left, right, label, result.metric,
                axis)


def _plain(value: Any) -> Any:
    """Settings and provenance as nested dicts/lists of scalars, for the generic renderer."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value


def _credentials(item: Any) -> dict[str, Any] | None:
    """The image's Content Credentials to show: only a manifest that is there (valid or not:
    an invalid one is shown as invalid); "none" and unreadable ones stay in the provenance."""
    value = (getattr(item, "model_extra", None) or {}).get("content_credentials")
    return value if isinstance(value, dict) and value.get("present") else None


def _base_metrics(item: Any) -> dict[str, float] | None:
    """The base model's own recovery's similarity to the original, when it was computed."""
    value = getattr(item, "base_recovery", None)
    if value is None:
        value = (getattr(item, "model_extra", None) or {}).get("base_recovery")
    return value if isinstance(value, dict) else None


def build(record: JobRecord, alpha: float, picture_url: dict[str, dict[str, str]]) -> Evidence:
    """The evidence of a succeeded job. ``picture_url[name][kind]`` is where each picture is
    (signed URLs on the page, data URIs in the report); kinds: original, partial, recovered
    and, when computed, base_recovered."""
    result = record.result
    if result is None:
        raise ValueError(f"job {record.job_id} has no result")
    settings = {k: v for k, v in record.settings.model_dump(mode="json").items()
                if v is not None}
    job_facts = {"job_id": record.job_id, "created_at": record.created_at,
                 "started_at": record.started_at, "finished_at": record.finished_at,
                 "attempts": record.attempts, "worker": record.worker,
                 "inputs": [{"name": i.name, "role": i.role, "filename": i.filename,
                             "size": f"{i.width}\u00d7{i.height}"} for i in record.inputs]}
    return build_result(record.job_id, result, alpha, picture_url, settings, job_facts)


def build_result(job_id: str, result: JobResult, alpha: float,
                 picture_url: dict[str, dict[str, str]], settings: dict[str, Any],
                 job_facts: dict[str, Any] | None) -> Evidence:
    """The evidence of a result, a job's or one of ``cgidm check`` (``cgidm report``)."""
    test = result.controls_test
    alpha = test.alpha if test is not None else alpha
    control_scores = [_verdict_score(c) for c in result.controls]

    def pictures(item: Any) -> list[Picture]:
        urls = picture_url.get(item.name, {})
        labels = {"original": "Original", "partial": "Half removed",
                  "recovered": "Recovered by the suspect model",
                  BASE_RECOVERED: "Recovered by the base model alone"}
        alts = {"original": f"{item.name}: your original image",
                "partial": f"{item.name}: with half of it removed",
                "recovered": f"{item.name}: as the suspect model recovered it",
                BASE_RECOVERED: f"{item.name}: as the base model alone recovered it"}
        kinds = ["original", "partial", "recovered"]
        if _base_metrics(item) is not None or urls.get(BASE_RECOVERED):
            kinds.append(BASE_RECOVERED)  # computed: shown beside the suspect's recovery
        return [Picture(kind, labels[kind], urls.get(kind, ""), alts[kind]) for kind in kinds]

    cards = []
    for item in result.images:
        verdict, detail = _image_card_words(_verdict_score(item), item.p_value, item.verdict,
                                            control_scores, alpha)
        cards.append(Card(item.name, "image", item.score, item.p_value, verdict,
                          HEADLINES[verdict], detail, pictures(item), dict(item.metrics),
                          getattr(item, "evidence_score", None), _credentials(item),
                          _base_metrics(item)))
    controls = []
    for item in result.controls:
        detail = "An image of yours that was never published: it shows how well the suspect " \
                 "model recovers images it cannot have seen."
        controls.append(Card(item.name, "control", item.score, None, CONTROL,
                             HEADLINES[CONTROL], detail, pictures(item), dict(item.metrics),
                             getattr(item, "evidence_score", None), _credentials(item),
                             _base_metrics(item)))

    set_verdict, set_sentence = _set_words(result, alpha)
    counts = {v: sum(1 for c in cards if c.verdict == v) for v in (MEMBER, NO_EVIDENCE,
                                                                   INCONCLUSIVE)}
    parts = []
    if counts[MEMBER]:
        parts.append(f"{counts[MEMBER]} with evidence of training")
    if counts[NO_EVIDENCE]:
        parts.append(f"{counts[NO_EVIDENCE]} without evidence")
    if counts[INCONCLUSIVE]:
        parts.append(f"{counts[INCONCLUSIVE]} inconclusive")
    summary = f"{_plural(len(cards), 'image')} checked: " + ", ".join(parts) + "."

    # Everything the result carries besides the per-image rows, generically: keys added later
    # (hashes, versions) appear without a template change.
    known = {"images", "controls"}
    provenance: dict[str, Any] = {k: _plain(v) for k, v in result.model_dump(mode="json").items()
                                  if k not in known and v not in (None, {}, [])}
    provenance.update({k: v for k, v in (result.model_extra or {}).items()
                       if k not in known and v not in (None, {}, [])})
    if job_facts:
        provenance["job"] = {k: _plain(v) for k, v in job_facts.items()
                             if v not in (None, {}, [])}
    return Evidence(job_id, result.pretrained, result.finetuned, result.metric, cards,
                    controls, summary, set_sentence, set_verdict,
                    _plot(result, cards, controls), settings, provenance, counts,
                    score_sentence(result))
