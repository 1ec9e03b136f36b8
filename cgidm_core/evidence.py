"""The evidence document: per-image scores, p-values against controls, verdicts, the set test.

Why one module: ``cgidm check`` (results.json), the service worker (result.json, the API result)
and ``cgidm eval`` all turn per-image values into the same evidence. Built in one place, the
verdict rests on the same score everywhere and a change of that score (chosen on the benchmark
suite, docs/ACCURACY.md) reaches every surface at once.

The verdict's score (:data:`DEFAULT_EVIDENCE`, "paired") is the suite's choice by its rule
(worst-case AUC first, then the mean, ties to the cheaper) among the scores that pass its null
controls (docs/ACCURACY.md: with a fine-tune equal to its base, or equal to it up to weight
noise, a score must not tell members from hold-outs), chosen over both families' pairs (pixel
and latent) and judged by leaving one recipe group out: the sum of the z-scores of two values
of each image,

- the shared-draw contrast (``contrast64``: the base model's denoising error minus the
  fine-tune's at the original image, over 64 (t, noise) draws that are the same for every
  image, so no draw noise separates two images), and
- the inversion's progress (how far the PGD's recovery moved from its start towards the
  original, along the line between them: ``record["inversion_scores"]["progress"]``; 0 when
  the recovery never left its start),

each standardised over the images judged together: the suspects and the controls. That pooling is
a symmetric function of all the images, so swapping a suspect with a control changes no one's
score: the empirical p-value of an image that is exchangeable with the controls stays exactly
valid, as it is for a single similarity. ``"similarity"`` is the former verdict (the similarity
metric alone) and ``"given"`` uses each record's ``score`` as it is (``cgidm eval``, which has
already scored its images with the method asked for).

Both are zero for every image when the fine-tune is its base. ``"objective+contrast"`` is the
verdict's score before 2026-12-08 (minus CGI-DM's objective over the PGD's second half + the
8-draw contrast; suite worst / mean over both families 0.54 / 0.825 against 0.62 / 0.874). The
former default ``"fused"`` (the recovery's masked SSIM and PSNR, the loss attack and the
contrast) also scored how easy an image's masked half is to fill in and how well the base
already denoises it: AUC 0.84 between the Van Gogh members and hold-outs with a LoRA still zero.
Recovery similarities made paired (minus the same image's at the PGD's starting point) pass the
exact null but not the weight-noise null, so the verdict does not use the recovered picture's
similarity.

Without controls there is nothing to standardise against or to compare with: the document has
the scores, no verdicts and no ``evidence_score``. When an image lacks a finite value the fusion
needs (a float16 overflow on a GPU, a record written by an older cgidm without
``inversion_scores``), :func:`build_evidence` falls back along :data:`FALLBACKS` ("paired" to
the scores an older record holds, still paired; then the similarity alone) and says so in
``evidence.fallback_from`` and ``evidence.fallback_reason``, rather than failing the check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

from .errors import ConfigError
from .names import DEFAULT_EVIDENCE  # the verdict's default score, shared with the CLI

#: The cheap scores :func:`cgidm_core.api.authenticate` computes for every image beside the
#: inversion (147 model evaluations on top of its 600): the verdict's shared-draw contrast, and
#: the loss attack and 8-draw contrast the other evidence choices and the fallbacks read.
ATTACK_SCORES: tuple[str, ...] = ("loss", "contrast", "contrast64")

#: Evidence name -> the per-image values summed as z-scores (all "higher = member").
#: ``metric:<name>`` is ``metrics[name]``; ``attack:<name>`` is ``attack_scores[name]``;
#: ``inversion:<name>`` is ``inversion_scores[name]`` (minus CGI-DM's objective along the PGD,
#: the PGD's progress and cosine towards the original).
EVIDENCE_COMPONENTS: dict[str, tuple[str, ...]] = {
    "paired": ("attack:contrast64", "inversion:progress"),
    "objective+contrast": ("inversion:objective_second_half", "attack:contrast"),
    "fused": ("metric:ssim", "metric:psnr", "attack:loss", "attack:contrast"),
    "contrast": ("attack:contrast",),
}
#: Every evidence a caller may ask for: the fusions, the similarity alone, the records' own score.
EVIDENCE_CHOICES: tuple[str, ...] = (*EVIDENCE_COMPONENTS, "similarity", "given")
#: What a verdict falls back to, in order, when an image lacks a value its evidence needs: the
#: paired score to the previous paired score (a record written before the PGD's progress and the
#: shared-draw contrast were recorded), then the contrast alone (still paired: 0 for every image
#: of a fine-tune equal to its base), and only then to the similarity alone.
FALLBACKS: dict[str, tuple[str, ...]] = {
    "paired": ("objective+contrast", "contrast", "similarity"),
    "objective+contrast": ("contrast", "similarity"),
    "fused": ("similarity",),
    "contrast": ("similarity",),
}
#: One sentence per evidence, written into every document under ``evidence.description``.
EVIDENCE_DESCRIPTIONS: dict[str, str] = {
    "paired": "z(contrast64: the base model's denoising error minus the fine-tune's at the "
              "original, 64 draws shared by every image) + z(progress: how far the inversion's "
              "recovery moved from its start towards the original), standardised over the "
              "images and controls judged together; with a fine-tune equal to its base every "
              "image scores the same (both are 0)",
    "objective+contrast": "z(minus CGI-DM's objective, averaged over the second half of the "
                          "inversion's steps) + z(contrast at the original, 8 draws), "
                          "standardised over the images and controls judged together (the "
                          "verdict's score before 2026-12-08)",
    "fused": "z(masked SSIM) + z(masked PSNR) of the recovery + z(loss attack) + z(contrast at "
             "the original), each standardised over the images and controls judged together "
             "(the verdict's score before the null controls; image-biased: AUC 0.84 on a "
             "latent pair whose fine-tune is its base)",
    "contrast": "z(contrast at the original): the base model's denoising error minus the "
                "fine-tune's at the image, no inversion",
    "similarity": "the recovery's similarity to its original (the score metric) alone",
    "given": "each image's score as computed by the method asked for",
}


class MissingEvidence(ConfigError):
    """An image lacks a value the fused score needs (not computed, or not finite)."""


def _value(record: Mapping[str, Any], where: str, name: str, component: str) -> float:
    value = (record.get(where) or {}).get(name)
    if value is None or not np.isfinite(float(value)):
        raise MissingEvidence(
            f"image {record.get('name')!r} has no finite {name!r} value in {where!r}, which the "
            f"{component!r} part of the verdict's score needs; score it with "
            "cgidm_core.authenticate (metrics ssim and psnr, inversion scores, attack scores "
            "loss, contrast and contrast64) or ask for evidence='similarity'")
    return float(value)


#: Where each kind of component is read in a record.
_SOURCES = {"metric": "metrics", "attack": "attack_scores", "inversion": "inversion_scores"}


def component_value(record: Mapping[str, Any], component: str) -> float:
    """One image's raw (unstandardised) value of one part of a verdict score.

    ``component`` is an entry of :data:`EVIDENCE_COMPONENTS` (``metric:<name>``,
    ``attack:<name>`` or ``inversion:<name>``); ``record`` is a per-image dict as
    :meth:`ImageResult.to_dict` writes it. Public because tools that resample images (the power
    table, ``benchmarks.power``) must fuse the same values the verdict fuses, read the same way.
    Raises :class:`MissingEvidence` when the record lacks a finite value, and
    :class:`~cgidm_core.errors.ConfigError` for a component of an unknown kind.
    """
    kind, _, name = component.partition(":")
    if kind not in _SOURCES or not name:
        raise ConfigError(f"unknown evidence component {component!r}; a component is "
                          f"<kind>:<name> with kind one of {', '.join(_SOURCES)}")
    return _value(record, _SOURCES[kind], name, component)


def component_values(record: Mapping[str, Any], evidence: str = DEFAULT_EVIDENCE
                     ) -> list[float]:
    """One image's raw values of every part of ``evidence`` (a fusion of
    :data:`EVIDENCE_COMPONENTS`), in that fusion's order: what :func:`evidence_scores`
    standardises over the images judged together and sums."""
    if evidence not in EVIDENCE_COMPONENTS:
        raise ConfigError(f"evidence {evidence!r} is not a fusion of components; choose from "
                          f"{', '.join(EVIDENCE_COMPONENTS)}")
    return [component_value(record, component) for component in EVIDENCE_COMPONENTS[evidence]]


def _zscores(values: np.ndarray) -> np.ndarray:
    std = values.std()
    if values.size < 2 or std == 0 or not np.isfinite(std):
        return np.zeros_like(values)
    return cast(np.ndarray, (values - values.mean()) / std)  # numpy types std() as Any


def _check_evidence(evidence: str) -> None:
    if evidence not in EVIDENCE_CHOICES:
        raise ConfigError(f"unknown evidence {evidence!r}; choose from "
                          f"{', '.join(EVIDENCE_CHOICES)}")


def evidence_scores(records: Sequence[Mapping[str, Any]], evidence: str = DEFAULT_EVIDENCE
                    ) -> list[float]:
    """The verdict's score of every record, standardised over exactly these records.

    ``records`` are per-image dicts as :meth:`ImageResult.to_dict` writes them (``score``,
    ``metrics``, ``attack_scores``); pass suspects and controls together.
    """
    _check_evidence(evidence)
    if evidence in ("similarity", "given"):
        return [float(r["score"]) for r in records]
    total = np.zeros(len(records))
    for component in EVIDENCE_COMPONENTS[evidence]:
        total += _zscores(np.array([component_value(r, component) for r in records], dtype=float))
    return [float(v) for v in total]


def evidence_settings(evidence: str, *, alpha: float | None = None) -> dict[str, Any]:
    """What the verdict rested on, as the ``evidence`` entry of every document."""
    out: dict[str, Any] = {"score": evidence, "description": EVIDENCE_DESCRIPTIONS[evidence]}
    if evidence in EVIDENCE_COMPONENTS:
        out["components"] = list(EVIDENCE_COMPONENTS[evidence])
        out["standardised_over"] = "images and controls together"
    if alpha is not None:
        out["alpha"] = alpha
    return out


def build_evidence(
    images: Sequence[Mapping[str, Any]],
    controls: Sequence[Mapping[str, Any]] = (),
    *,
    alpha: float = 0.05,
    evidence: str = DEFAULT_EVIDENCE,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The evidence document of one check: what results.json, the service and eval all write.

    Returns ``{"images", "controls", "set_test", "evidence", "settings"}``: copies of the records
    in the order given; with controls each image gains ``p_value``, ``verdict`` and
    ``evidence_score`` (the number its p-value is computed from), each control its
    ``evidence_score``, and ``set_test`` is :func:`cgidm_core.stats.controls_test`'s dict
    (``p_values`` and ``verdicts`` included); without controls ``set_test`` is None and no
    image has a verdict.
    """
    from .stats import controls_test

    _check_evidence(evidence)
    asked = evidence
    suspects = [dict(r) for r in images]
    references = [dict(r) for r in controls]
    document: dict[str, Any] = {
        "images": suspects,
        "controls": references,
        "set_test": None,
        "evidence": evidence_settings(evidence, alpha=alpha if references else None),
        "settings": dict(settings or {}),
    }
    if not references:
        _add_size_advice(document, len(suspects), 0, None)
        return document
    if not suspects:
        raise ConfigError("no images to judge against the controls; give at least one image")
    scores, evidence, reason = _scores_with_fallback([*suspects, *references], evidence)
    if reason is not None:
        document["evidence"] = {**evidence_settings(evidence, alpha=alpha),
                                "fallback_from": asked, "fallback_reason": reason}
    for record, value in zip([*suspects, *references], scores, strict=True):
        record["evidence_score"] = value
    test = controls_test(scores[: len(suspects)], scores[len(suspects):], alpha=alpha)
    for record, p_value, verdict in zip(suspects, test.p_values, test.verdicts, strict=True):
        record["p_value"], record["verdict"] = p_value, verdict
    document["set_test"] = test.to_dict()
    _add_size_advice(document, len(suspects), len(references), test.p_value)
    return document


def _scores_with_fallback(records: Sequence[Mapping[str, Any]], evidence: str
                          ) -> tuple[list[float], str, str | None]:
    """The records' scores under ``evidence``, or under the first of its :data:`FALLBACKS` that
    every record has the values for. A value that overflowed (float16 on a GPU), or a record
    made without the starting point's similarity (an older cgidm), must not cost the user the
    whole check: the verdict falls back and the document says why. Returns (scores, the
    evidence used, why it fell back or None)."""
    try:
        return evidence_scores(records, evidence), evidence, None
    except MissingEvidence as exc:
        reason = str(exc)
        for fallback in FALLBACKS.get(evidence, ()):
            try:
                return evidence_scores(records, fallback), fallback, reason
            except MissingEvidence:
                continue
        raise


def _add_size_advice(document: dict[str, Any], n_images: int, n_controls: int,
                     p_value: float | None) -> None:
    """``evidence.too_small_to_decide``: how many images and controls the power table
    (cgidm_core.power_table) says a set-level p < 0.01 needs, when this set is too small."""
    from .power_table import advice

    sentence = advice(n_images, n_controls, p_value)
    if sentence:
        document["evidence"]["too_small_to_decide"] = sentence
