"""Honest statistics for membership evidence.

Every function here takes plain score lists where a HIGHER score means "more member-like" (for
CGI-DM: the similarity of the recovery to the original; for the baselines: minus an error).

Three questions, three tools:

- *Is this one image a member?* Needs known non-members ("controls") of the same kind: they give
  a null distribution and an empirical p-value per image (:func:`empirical_p_value`,
  :func:`controls_test`). Without controls there is no calibrated per-image answer, only a score.
- *Does the suspect set as a whole score higher than the controls?* A one-sided Mann-Whitney U
  rank test (:func:`controls_test`), which assumes nothing about the score distribution.
- *How good is a method?* With labelled members and non-members: AUC with a bootstrap interval,
  TPR at a low FPR only when enough non-members exist for that FPR to be resolvable, the
  best-threshold accuracy clearly flagged as an oracle, and the CopyMark protocol that picks the
  threshold on one half of the data and measures on the other (:func:`evaluate_scores`,
  :func:`calibrated_split`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from scipy import stats as sps
from sklearn.metrics import roc_auc_score, roc_curve

from cgidm_core.errors import ConfigError

# The verdict names live in the torch-free vocabulary the gateway shares; re-exported here.
from cgidm_core.names import INCONCLUSIVE as INCONCLUSIVE
from cgidm_core.names import MEMBER_EVIDENCE as MEMBER_EVIDENCE
from cgidm_core.names import NO_EVIDENCE as NO_EVIDENCE
from cgidm_core.names import VERDICTS as VERDICTS

#: Above this many scores in total the exact Mann-Whitney distribution gets slow (seconds) and the
#: normal approximation is accurate to the third digit, so we switch to it.
_EXACT_MWU_MAX_TOTAL = 400


def _as_scores(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    """Validate a score list: 1-D, non-empty, finite. NaN would silently poison every rank."""
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be a list of numbers ({exc})") from exc
    if arr.size == 0:
        raise ConfigError(f"{what} is empty: give at least one score")
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise ConfigError(
            f"{what} contains {bad} NaN/infinite score(s); re-run the scoring or drop those images"
        )
    return arr


def _check_fraction(value: float, what: str) -> float:
    if not (0.0 < float(value) < 1.0):
        raise ConfigError(f"{what} must be strictly between 0 and 1, got {value}")
    return float(value)


# --------------------------------------------------------------------------------------------
# Controls: per-image p-values and a set-level rank test
# --------------------------------------------------------------------------------------------


def empirical_p_value(score: float, control_scores: Sequence[float]) -> float:
    """P-value of one suspect score against known non-members: ``(1 + #{c >= score}) / (n + 1)``.

    The +1 in numerator and denominator counts the suspect image itself as one draw from the null
    (Davison & Hinkley 1997; Phipson & Smyth 2010). Under the null hypothesis "this image is
    exchangeable with the controls" the suspect's rank among the n + 1 scores is uniform, so this
    p-value is exactly valid (P(p <= a) <= a), and it is never 0: with n controls the smallest
    reachable p-value is ``1 / (n + 1)``. Ties count against membership (``>=``), which keeps it
    conservative.
    """
    s = float(_as_scores([score], "score")[0])
    controls = _as_scores(control_scores, "control scores")
    return float((1 + np.count_nonzero(controls >= s)) / (controls.size + 1))


@dataclass
class ControlsTest:
    """Evidence from comparing suspect images with known non-member controls.

    ``p_values``/``verdicts`` are per suspect image (same order as given); ``u_statistic``,
    ``p_value`` and ``auc`` describe the whole suspect set against the controls.
    """

    p_values: list[float]
    verdicts: list[str]
    u_statistic: float
    p_value: float
    auc: float
    n_suspect: int
    n_controls: int
    alpha: float
    #: Smallest per-image p-value reachable with this many controls: 1 / (n_controls + 1).
    min_reachable_p: float = 0.0
    #: How the set-level p-value was computed ("exact" or "asymptotic").
    test_method: str = "exact"
    #: A sentence a person can read: what the verdicts mean and their limits.
    explanation: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def controls_test(
    suspect_scores: Sequence[float],
    control_scores: Sequence[float],
    *,
    alpha: float = 0.05,
) -> ControlsTest:
    """Per-image empirical p-values and a one-sided Mann-Whitney U test of suspects vs controls.

    A verdict is ``"member_evidence"`` when the image's p-value is at most ``alpha``, else
    ``"no_evidence"`` ("no evidence" is not "evidence of non-membership"). When there are too few
    controls for any p-value to reach ``alpha`` (``1 / (n + 1) > alpha``) every image's verdict is
    ``"inconclusive"``: the controls, not the image, decided it. The per-image p-values are not
    corrected for multiple images; the set-level U test is the one-number answer for a set and
    still decides there.

    The U statistic is scipy's U of the suspects (pairs where a suspect beats a control, ties
    counting one half), so ``auc = U / (n_suspect * n_controls)`` is the probability that a random
    suspect outscores a random control. The p-value is exact when there are no ties and fewer than
    400 scores in total, the tie-corrected normal approximation otherwise.
    """
    alpha = _check_fraction(alpha, "alpha")
    suspects = _as_scores(suspect_scores, "suspect scores")
    controls = _as_scores(control_scores, "control scores")
    n1, n0 = suspects.size, controls.size

    p_values = [float((1 + np.count_nonzero(controls >= s)) / (n0 + 1)) for s in suspects]
    min_p = 1.0 / (n0 + 1)
    reachable = min_p <= alpha + 1e-12
    verdicts = [
        (MEMBER_EVIDENCE if p <= alpha else NO_EVIDENCE) if reachable else INCONCLUSIVE
        for p in p_values
    ]

    pooled = np.concatenate([suspects, controls])
    has_ties = np.unique(pooled).size < pooled.size
    method = "exact" if (not has_ties and pooled.size <= _EXACT_MWU_MAX_TOTAL) else "asymptotic"
    result = sps.mannwhitneyu(suspects, controls, alternative="greater", method=method)
    u = float(result.statistic)

    need = math.ceil(1.0 / alpha - 1e-9) - 1  # smallest n with 1 / (n + 1) <= alpha
    if not reachable:
        explanation = (
            f"With {n0} control(s) the smallest possible per-image p-value is 1/({n0}+1) = "
            f"{min_p:.3g}, above alpha = {alpha:g}: no single image can show member evidence, "
            "so every per-image verdict is 'inconclusive'. "
            f"Use at least {need} known non-member images ({need - n0} more) to decide per "
            "image; the set-level Mann-Whitney test still applies."
        )
    else:
        n_hit = verdicts.count(MEMBER_EVIDENCE)
        explanation = (
            f"{n_hit} of {n1} image(s) score above all but a fraction alpha = {alpha:g} of the "
            f"{n0} controls (p <= alpha, uncorrected for multiple images). With {n0} controls the "
            f"smallest reachable p-value is 1/({n0}+1) = {min_p:.3g}. 'no_evidence' means not "
            "distinguishable from the controls, not proof of non-membership."
        )
    return ControlsTest(
        p_values=p_values,
        verdicts=verdicts,
        u_statistic=u,
        p_value=float(result.pvalue),
        auc=u / (n1 * n0),
        n_suspect=int(n1),
        n_controls=int(n0),
        alpha=alpha,
        min_reachable_p=min_p,
        test_method=method,
        explanation=explanation,
    )


# --------------------------------------------------------------------------------------------
# Labelled evaluation: AUC with an interval, TPR at low FPR, the oracle accuracy
# --------------------------------------------------------------------------------------------


def min_nonmembers_for_fpr(fpr: float) -> int:
    """Non-members needed before "TPR at this FPR" can be measured at all.

    With n non-members the FPR moves in steps of 1/n, so an FPR of 1 % is only resolvable with at
    least 100 of them (and even then one false positive decides it).
    """
    return math.ceil(1.0 / fpr - 1e-9)


@dataclass
class TprAtFpr:
    """TPR at a target FPR, or the reason it is not reported."""

    target_fpr: float
    tpr: float | None
    #: The FPR the chosen ROC point actually has on this data (<= target).
    achieved_fpr: float | None
    threshold: float | None
    reason: str | None = None


@dataclass
class EvalReport:
    """Separation of member and non-member scores, reported without flattering shortcuts."""

    n_members: int
    n_nonmembers: int
    auc: float
    #: Percentile bootstrap interval (members and non-members resampled separately).
    auc_ci_low: float | None
    auc_ci_high: float | None
    auc_ci_level: float
    n_bootstrap: int
    seed: int
    #: Best accuracy over all thresholds, with the threshold CHOSEN ON THESE SAME SCORES: an
    #: optimistic upper bound, not what a deployed threshold would reach.
    oracle_best_accuracy: float
    #: ``None`` when the best rule is "nobody is a member" (threshold +infinity).
    oracle_threshold: float | None
    tpr_at_fpr: list[TprAtFpr]
    roc_fpr: list[float]
    roc_tpr: list[float]
    #: Thresholds of the ROC points (``score >= threshold`` means member); the first point, which
    #: calls nothing a member, has threshold ``None`` (it is +infinity).
    roc_thresholds: list[float | None]
    ci_note: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tpr_for(self, fpr: float) -> TprAtFpr | None:
        for item in self.tpr_at_fpr:
            if math.isclose(item.target_fpr, fpr):
                return item
        return None


def _auc_statistic(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUC = U / (n_x * n_y), vectorised over bootstrap resamples (scipy passes a batch axis)."""
    u = sps.mannwhitneyu(x, y, axis=axis, method="asymptotic").statistic
    return cast(np.ndarray, u / (x.shape[axis] * y.shape[axis]))  # scipy is untyped here


def evaluate_scores(
    member_scores: Sequence[float],
    nonmember_scores: Sequence[float],
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    target_fprs: Sequence[float] = (0.01, 0.05),
    confidence_level: float = 0.95,
) -> EvalReport:
    """AUC with a bootstrap interval, oracle accuracy, TPR at low FPR where resolvable, ROC points.

    The interval is scipy's percentile bootstrap with members and non-members resampled
    separately (stratified, so every resample keeps both class sizes), seeded. Percentile rather
    than BCa because perfectly separated sets (AUC = 1 in every resample) make BCa undefined.
    It reflects the sampling of *images*, not the randomness of the scoring method.
    """
    members = _as_scores(member_scores, "member scores")
    nonmembers = _as_scores(nonmember_scores, "non-member scores")
    if n_bootstrap < 0:
        raise ConfigError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    confidence_level = _check_fraction(confidence_level, "confidence_level")
    n1, n0 = members.size, nonmembers.size

    # 1. The AUC itself (members labelled 1).
    labels = np.concatenate([np.ones(n1), np.zeros(n0)])
    scores = np.concatenate([members, nonmembers])
    auc = float(roc_auc_score(labels, scores))

    # 2. The AUC's bootstrap interval over images (or a note saying why there is none).
    ci_low, ci_high, ci_note = _auc_interval(members, nonmembers, n_bootstrap=n_bootstrap,
                                             seed=seed, confidence_level=confidence_level)

    # 3. The ROC curve, and the accuracy of the rule "score >= threshold means member" at every
    #    ROC point (the oracle's best is optimistic: see the note).
    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    acc = (tpr * n1 + (1.0 - fpr) * n0) / (n1 + n0)
    best = int(np.argmax(acc))

    # 4. TPR at each low FPR the number of non-members can resolve.
    tpr_items = _tpr_at_fprs(fpr, tpr, thr, n0, target_fprs)

    notes = [
        "oracle_best_accuracy uses the threshold that is best ON THESE SAME SCORES: an optimistic "
        "upper bound, not a calibrated accuracy (use calibrated_split / --calibrate-split)."
    ]
    return EvalReport(
        n_members=int(n1),
        n_nonmembers=int(n0),
        auc=auc,
        auc_ci_low=ci_low,
        auc_ci_high=ci_high,
        auc_ci_level=confidence_level,
        n_bootstrap=int(n_bootstrap),
        seed=int(seed),
        oracle_best_accuracy=float(acc[best]),
        oracle_threshold=float(thr[best]) if np.isfinite(thr[best]) else None,
        tpr_at_fpr=tpr_items,
        roc_fpr=[float(v) for v in fpr],
        roc_tpr=[float(v) for v in tpr],
        roc_thresholds=[float(v) if np.isfinite(v) else None for v in thr],
        ci_note=ci_note,
        notes=notes,
    )


def _auc_interval(members: np.ndarray, nonmembers: np.ndarray, *, n_bootstrap: int, seed: int,
                  confidence_level: float) -> tuple[float | None, float | None, str | None]:
    """The AUC's percentile bootstrap interval (low, high) and a note on it: why there is none,
    or that it is rough for small sets."""
    n1, n0 = members.size, nonmembers.size
    ci_low: float | None = None
    ci_high: float | None = None
    ci_note: str | None = None
    if n_bootstrap == 0:
        ci_note = "bootstrap disabled (n_bootstrap=0)"
    elif n1 < 2 or n0 < 2:
        ci_note = "no interval: the bootstrap needs at least 2 members and 2 non-members"
    else:
        res = sps.bootstrap(
            (members, nonmembers),
            _auc_statistic,
            n_resamples=n_bootstrap,
            vectorized=True,
            paired=False,
            confidence_level=confidence_level,
            method="percentile",
            batch=max(1, 2_000_000 // (n1 + n0)),
            rng=np.random.default_rng(seed),
        )
        ci_low = float(res.confidence_interval.low)
        ci_high = float(res.confidence_interval.high)
        if n1 + n0 < 40:
            ci_note = (
                f"only {n1}+{n0} images: the bootstrap interval is rough and tends to be too "
                "narrow for sets this small"
            )
    return ci_low, ci_high, ci_note


def _tpr_at_fprs(fpr: np.ndarray, tpr: np.ndarray, thr: np.ndarray, n0: int,
                 target_fprs: Sequence[float]) -> list[TprAtFpr]:
    """The best TPR at each target FPR, or why it cannot be resolved with ``n0`` non-members."""
    tpr_items: list[TprAtFpr] = []
    for target in target_fprs:
        target = _check_fraction(target, "target FPR")
        need = min_nonmembers_for_fpr(target)
        if n0 < need:
            tpr_items.append(TprAtFpr(
                target_fpr=target, tpr=None, achieved_fpr=None, threshold=None,
                reason=(f"TPR at {target:.0%} FPR needs at least {need} "
                        f"non-members, there are {n0} (one false positive is already "
                        f"{1 / n0:.0%} FPR)"),
            ))
            continue
        ok = np.flatnonzero(fpr <= target + 1e-12)
        i = int(ok[np.argmax(tpr[ok])])
        tpr_items.append(TprAtFpr(
            target_fpr=target, tpr=float(tpr[i]), achieved_fpr=float(fpr[i]),
            threshold=None if not np.isfinite(thr[i]) else float(thr[i]),
        ))
    return tpr_items


# --------------------------------------------------------------------------------------------
# CopyMark protocol: threshold chosen on one half, measured on the other
# --------------------------------------------------------------------------------------------


@dataclass
class CalibratedSplit:
    """TPR/FPR on held-out halves with a threshold picked for ``target_fpr`` on the other half.

    Means and standard deviations are over ``2 * repeats`` evaluations (each random split is used
    both ways round).
    """

    target_fpr: float
    repeats: int
    seed: int
    n_members: int
    n_nonmembers: int
    #: Non-members in each calibration half (the FPR there moves in steps of 1 / this).
    n_calibration_nonmembers: int
    tpr_mean: float
    tpr_std: float
    fpr_mean: float
    fpr_std: float
    #: Fraction of evaluations whose held-out FPR exceeded the target.
    fpr_over_target_rate: float
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _threshold_for_fpr(nonmembers: np.ndarray, target_fpr: float) -> float:
    """Threshold t for the rule ``score > t`` whose FPR on ``nonmembers`` is at most the target.

    It is the (k+1)-th largest non-member score, with k = floor(target * n) false positives
    allowed: at most k non-members lie strictly above it.
    """
    k = int(math.floor(target_fpr * nonmembers.size + 1e-9))
    return float(np.sort(nonmembers)[::-1][min(k, nonmembers.size - 1)])


def calibrated_split(
    member_scores: Sequence[float],
    nonmember_scores: Sequence[float],
    *,
    target_fpr: float = 0.05,
    seed: int = 0,
    repeats: int = 100,
) -> CalibratedSplit:
    """The CopyMark protocol (Ma et al., 2024): calibrate on one half, measure on the other.

    Each repeat shuffles members and non-members separately (seeded) and cuts each in half, so
    both halves keep the class balance. A threshold for ``target_fpr`` is chosen on the first
    half's non-members and applied to the second half (and vice versa). The reported FPR is the
    one actually reached on data the threshold never saw, which is the number a user of a fixed
    threshold would experience.
    """
    target_fpr = _check_fraction(target_fpr, "target_fpr")
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    members = _as_scores(member_scores, "member scores")
    nonmembers = _as_scores(nonmember_scores, "non-member scores")
    if members.size < 2 or nonmembers.size < 2:
        raise ConfigError(
            "calibrated split needs at least 2 members and 2 non-members (one for each half)"
        )
    rng = np.random.default_rng(seed)
    tprs: list[float] = []
    fprs: list[float] = []
    for _ in range(repeats):
        m = rng.permutation(members)
        n = rng.permutation(nonmembers)
        halves = [
            (m[: m.size // 2], n[: n.size // 2]),
            (m[m.size // 2:], n[n.size // 2:]),
        ]
        # The threshold targets an FPR, so only the calibration half's non-members choose it.
        for (_, cal_n), (test_m, test_n) in ((halves[0], halves[1]), (halves[1], halves[0])):
            thr = _threshold_for_fpr(cal_n, target_fpr)
            tprs.append(float(np.mean(test_m > thr)))
            fprs.append(float(np.mean(test_n > thr)))
    n_cal = nonmembers.size // 2
    need = min_nonmembers_for_fpr(target_fpr)
    note = None
    if n_cal < need:
        note = (
            f"each calibration half has only {n_cal} non-members (< {need}): the threshold is "
            f"just the highest calibration non-member score, so the target FPR of "
            f"{target_fpr:.0%} cannot really be aimed at; read the reached FPR, not the target"
        )
    fprs_arr = np.asarray(fprs)
    return CalibratedSplit(
        target_fpr=target_fpr,
        repeats=int(repeats),
        seed=int(seed),
        n_members=int(members.size),
        n_nonmembers=int(nonmembers.size),
        n_calibration_nonmembers=int(n_cal),
        tpr_mean=float(np.mean(tprs)),
        tpr_std=float(np.std(tprs)),
        fpr_mean=float(fprs_arr.mean()),
        fpr_std=float(fprs_arr.std()),
        fpr_over_target_rate=float(np.mean(fprs_arr > target_fpr + 1e-12)),
        note=note,
    )


# --------------------------------------------------------------------------------------------
# Picture
# --------------------------------------------------------------------------------------------


def plot_report(
    report: EvalReport,
    member_scores: Sequence[float],
    nonmember_scores: Sequence[float],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Write a PNG: ROC curve (left) and the two score histograms (right)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    members = _as_scores(member_scores, "member scores")
    nonmembers = _as_scores(nonmember_scores, "non-member scores")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    fig, (ax_roc, ax_hist) = plt.subplots(1, 2, figsize=(10, 4.2))
    ci = ""
    if report.auc_ci_low is not None:
        ci = f" [{report.auc_ci_low:.2f}, {report.auc_ci_high:.2f}]"
    ax_roc.plot(report.roc_fpr, report.roc_tpr, lw=2,
                label=f"AUC {report.auc:.3f}{ci}")
    ax_roc.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax_roc.set_xlim(0, 1)
    ax_roc.set_ylim(0, 1.02)
    ax_roc.set_xlabel("false positive rate")
    ax_roc.set_ylabel("true positive rate")
    ax_roc.set_title(f"ROC ({report.n_members} members, {report.n_nonmembers} non-members)")
    ax_roc.legend(loc="lower right")

    lo = float(min(members.min(), nonmembers.min()))
    hi = float(max(members.max(), nonmembers.max()))
    if hi <= lo:
        hi = lo + 1e-6
    bins = np.linspace(lo, hi, max(5, min(30, (members.size + nonmembers.size) // 2)) + 1)
    ax_hist.hist(nonmembers, bins=bins, alpha=0.6, label="non-members / hold-out")
    ax_hist.hist(members, bins=bins, alpha=0.6, label="members")
    ax_hist.set_xlabel("score (higher = more member-like)")
    ax_hist.set_ylabel("images")
    ax_hist.set_title("score distributions")
    ax_hist.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
