"""Leave-one-group-out choice of the verdict's score: numbers measured on groups it was not
chosen on.

Why: a score chosen on the same pairs it is then measured on looks better than it is (the
suite's 0.93 worst case was both). Here the choice rule of the suite (worst case first, then
the mean, then the cheaper: :func:`cgidm_core.suite_scores.rank_candidates`) is applied to all
recipe groups but one, and the chosen candidate is measured on the group left out; every group
is left out once. Each pair is then measured exactly once by a score that did not see it, and
the worst and the mean of those held-out AUCs are the headline. The in-sample numbers (the
candidate chosen on every group, measured on the same pairs) go beside them, never instead.

Inputs are plain mappings so that the benchmark, the docs and the tests share this one
function: ``aucs[candidate][pair] = AUC`` and ``groups[pair] = group``. Where the per-image
scores are at hand (``scores[candidate][pair] = (members, non-members)``), the held-out worst
and mean get percentile bootstrap intervals: images are resampled within each pair (members and
non-members apart), the choices per fold held fixed, so the interval is that of the
measurement, not of the choice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class Fold:
    """One group left out: what was chosen without it and how that did on it."""

    group: str
    chosen: str
    pairs: tuple[str, ...]
    aucs: tuple[float, ...]
    #: worst / mean AUC over the groups it was chosen on (in-sample for this fold)
    chosen_worst: float
    chosen_mean: float

    @property
    def worst(self) -> float:
        return min(self.aucs)

    @property
    def mean(self) -> float:
        return float(np.mean(self.aucs))


@dataclass
class HeldOutReport:
    """Every fold, the held-out headline and the in-sample numbers beside it."""

    folds: list[Fold]
    held_out_worst: float
    held_out_mean: float
    in_sample_choice: str
    in_sample_worst: float
    in_sample_mean: float
    #: 95 % percentile bootstrap intervals of the held-out worst and mean (None without scores)
    held_out_worst_ci: tuple[float, float] | None = None
    held_out_mean_ci: tuple[float, float] | None = None
    n_bootstrap: int = 0
    candidates: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["folds"] = [{**asdict(f), "worst": f.worst, "mean": f.mean} for f in self.folds]
        return out


def choose(aucs: Mapping[str, Mapping[str, float]], pairs: Sequence[str],
           costs: Mapping[str, int] | None = None) -> tuple[str, float, float]:
    """The candidate the suite's rule picks on ``pairs``: (name, worst AUC, mean AUC)."""
    from .suite_scores import rank_candidates

    if not pairs:
        raise ConfigError("choosing a score needs at least one pair")
    table = {name: [float(by_pair[p]) for p in pairs] for name, by_pair in aucs.items()}
    ranked = rank_candidates(table, {name: int((costs or {}).get(name, 0)) for name in table})
    name, worst, mean, _cost = ranked[0]
    return name, worst, mean


def _complete(aucs: Mapping[str, Mapping[str, float]],
              groups: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """Candidates measured on every grouped pair (others cannot be compared fairly)."""
    pairs = list(groups)
    out = {name: {p: float(by_pair[p]) for p in pairs}
           for name, by_pair in aucs.items() if all(p in by_pair for p in pairs)}
    if not out:
        raise ConfigError("no candidate score was measured on every pair; nothing to choose from")
    return out


def _auc(members: np.ndarray, others: np.ndarray) -> float:
    diff = members[:, None] - others[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def leave_one_group_out(
    aucs: Mapping[str, Mapping[str, float]],
    groups: Mapping[str, str],
    *,
    costs: Mapping[str, int] | None = None,
    scores: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> HeldOutReport:
    """Choose on all groups but one, measure on the one left out, for every group.

    ``aucs[candidate][pair]``: AUC of each candidate on each pair; ``groups[pair]``: the pair's
    recipe group (at least two groups). ``costs[candidate]``: model evaluations per image, for
    ties. ``scores[candidate][pair] = (member scores, non-member scores)``: when given for the
    chosen candidates, the held-out worst and mean get bootstrap intervals.
    """
    names = sorted(set(groups.values()))
    if len(names) < 2:
        raise ConfigError(f"leave-one-group-out needs at least two groups, got {names}")
    table = _complete(aucs, groups)
    folds = []
    for group in names:
        inside = [p for p, g in groups.items() if g == group]
        outside = [p for p, g in groups.items() if g != group]
        chosen, worst, mean = choose(table, outside, costs)
        folds.append(Fold(group, chosen, tuple(inside),
                          tuple(table[chosen][p] for p in inside), worst, mean))
    held = [a for f in folds for a in f.aucs]
    everything = list(groups)
    best, best_worst, best_mean = choose(table, everything, costs)
    report = HeldOutReport(
        folds=folds, held_out_worst=round(min(held), 3),
        held_out_mean=round(float(np.mean(held)), 3),
        in_sample_choice=best, in_sample_worst=best_worst, in_sample_mean=best_mean,
        candidates=sorted(table),
    )
    if scores is not None and n_bootstrap > 0 and all(
            p in scores.get(f.chosen, {}) for f in folds for p in f.pairs):
        report.held_out_worst_ci, report.held_out_mean_ci = _bootstrap(
            folds, scores, n_bootstrap, seed)
        report.n_bootstrap = n_bootstrap
    return report


def fixed_score(scores: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Worst and mean AUC of ONE score fixed in advance over ``scores[pair] = (members,
    non-members)``, with the same percentile bootstrap intervals as the held-out numbers (no
    choice is made, so there is nothing to hold out: what a shipped default gives)."""
    pairs = sorted(scores)
    if not pairs:
        raise ConfigError("no pair to measure the score on")
    aucs = [_auc(np.asarray(scores[p][0], float), np.asarray(scores[p][1], float)) for p in pairs]
    fold = Fold("all", "fixed", tuple(pairs), tuple(aucs), min(aucs), float(np.mean(aucs)))
    worst_ci, mean_ci = _bootstrap([fold], {"fixed": scores}, n_bootstrap, seed)
    return {"worst": round(min(aucs), 3), "mean": round(float(np.mean(aucs)), 3),
            "worst_ci": worst_ci, "mean_ci": mean_ci, "pairs": len(pairs)}


def _bootstrap(folds: Sequence[Fold],
               scores: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
               n_bootstrap: int, seed: int
               ) -> tuple[tuple[float, float], tuple[float, float]]:
    """Percentile intervals of the held-out worst and mean: images resampled within each pair
    (members and non-members apart), each fold's choice held fixed."""
    rng = np.random.default_rng(seed)
    sets = [(np.asarray(scores[f.chosen][p][0], float), np.asarray(scores[f.chosen][p][1], float))
            for f in folds for p in f.pairs]
    worst = np.empty(n_bootstrap)
    mean = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        values = [_auc(m[rng.integers(0, len(m), len(m))], h[rng.integers(0, len(h), len(h))])
                  for m, h in sets]
        worst[b], mean[b] = min(values), float(np.mean(values))

    def interval(x: np.ndarray) -> tuple[float, float]:
        lo, hi = np.percentile(x, [2.5, 97.5])
        return round(float(lo), 3), round(float(hi), 3)

    return interval(worst), interval(mean)
