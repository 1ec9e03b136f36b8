"""The paper's evaluation protocol, computed so that our numbers can be set beside the publication.

What the authors' ``Validator.py`` (Nicholas0228/Revelio) does, restated:

- every original of a split (members, hold-outs) is scored by its BEST cosine similarity over
  ALL recoveries of that split, not by its own recovery: an original whose recovery failed can
  borrow the score of a neighbour's;
- the accuracy is the best over 1000 thresholds between the lowest and the highest score,
  chosen on these same scores (an oracle: no threshold chosen elsewhere is applied);
- the AUC is integrated over a grid of 1001 thresholds between the lowest and highest score.

cgidm's own protocol (an image against its own recovery, a threshold calibrated on data it is not
measured on, the false-positive rate actually reached) lives in :mod:`cgidm_core.stats`; this
module exists for comparison only and labels its figures as the paper's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .images import to_tensor
from .names import FEATURE_METRICS
from .similarity import FeatureModel, compute_metrics, score_from_metric

#: Thresholds of the paper's accuracy search and AUC grid (``find_threshold``,
#: ``calculate_auc_asr_stat``).
GRID_STEPS = 1000


def best_match_scores(
    originals: Sequence[Any],
    recoveries: Sequence[Any],
    metric: str,
    *,
    feature_model: FeatureModel | None = None,
    keep: torch.Tensor | None = None,
    size: int | None = None,
) -> tuple[list[float], list[int]]:
    """Each original's best score over all ``recoveries`` (PIL pictures) and which one gave it.

    Feature metrics embed the pictures as given (the paper embeds the dataset file and the saved
    PNG). Pixel metrics need ``size`` (the pair's) and the pixel ``keep`` mask: they compare the
    recovered region of every original with that of every recovery; "best" is the highest
    membership score (the lowest error for ``mse``).
    """
    if not originals or not recoveries:
        raise ValueError("need at least one original and one recovery")
    if metric in FEATURE_METRICS:
        if feature_model is None:
            raise ValueError(f"metric {metric!r} needs a feature model")
        sim = feature_model.embed_pictures(originals) @ feature_model.embed_pictures(recoveries).T
        best, index = sim.max(dim=1)
        return [float(v) for v in best], [int(i) for i in index]
    if size is None or keep is None:
        raise ValueError("pixel metrics need the image size and the keep mask")
    a, b = to_tensor(list(originals), size), to_tensor(list(recoveries), size)
    n, m = a.shape[0], b.shape[0]
    rows = compute_metrics(a.repeat_interleave(m, 0), b.repeat(n, 1, 1, 1), keep, [metric])
    scores = torch.tensor([score_from_metric(metric, v) for v in rows[metric]]).view(n, m)
    best, index = scores.max(dim=1)
    return [float(v) for v in best], [int(i) for i in index]


def grid_auc(members: Sequence[float], holdout: Sequence[float]) -> float | None:
    """The paper's AUC: trapezoids over TPR/FPR at 1001 evenly spaced thresholds (``>=``).

    Equal to the exact ROC AUC unless two scores lie closer than 1/1000 of the score range.
    ``None`` when every score is the same (the authors' ``torch.range`` fails there).
    """
    pos, neg = np.asarray(members, float), np.asarray(holdout, float)
    low, high = min(pos.min(), neg.min()), max(pos.max(), neg.max())
    if high <= low:
        return None
    thresholds = low + (high - low) * np.arange(GRID_STEPS + 1) / GRID_STEPS
    tpr = np.array([(pos >= t).mean() for t in thresholds])
    fpr = np.array([(neg >= t).mean() for t in thresholds])
    # Rising thresholds lower both rates; walked backwards the curve runs from (0, 0) upwards.
    return float(np.trapezoid(tpr[::-1], fpr[::-1]))


def grid_best_accuracy(members: Sequence[float], holdout: Sequence[float]) -> float:
    """The paper's accuracy: the best of 1000 thresholds, chosen on the scores it is measured on.

    Thresholds are ``low + (high - low) * i / 1000`` for i = 1..1000; an image counts as a member
    at or above the threshold.
    """
    pos, neg = np.asarray(members, float), np.asarray(holdout, float)
    low, high = min(pos.min(), neg.min()), max(pos.max(), neg.max())
    best = 0
    for i in range(1, GRID_STEPS + 1):
        threshold = low + (high - low) * i / GRID_STEPS
        best = max(best, int((pos >= threshold).sum() + (neg < threshold).sum()))
    return best / (pos.size + neg.size)


def paper_protocol(
    member_best: Sequence[float], holdout_best: Sequence[float], metric: str
) -> dict[str, Any]:
    """The paper's figures from best-match scores, labelled with what they are."""
    from sklearn.metrics import roc_auc_score

    labels = [1] * len(member_best) + [0] * len(holdout_best)
    scores = list(member_best) + list(holdout_best)
    exact = float(roc_auc_score(labels, scores)) if len(set(labels)) == 2 else None
    return {
        "protocol": "paper (Revelio Validator.py)",
        "metric": metric,
        "score": "each original's best match over all recoveries of its split (feature "
                 "metrics: the original file as given, as the paper embeds it)",
        "auc": grid_auc(member_best, holdout_best),
        "auc_exact": exact,
        "accuracy": grid_best_accuracy(member_best, holdout_best),
        "accuracy_threshold": "chosen on the test scores themselves (oracle, optimistic)",
        "n_members": len(member_best),
        "n_holdout": len(holdout_best),
        "note": None if metric in FEATURE_METRICS else (
            f"the paper scores with CLIP or DINO embeddings; this is the same protocol on "
            f"{metric!r}"
        ),
    }
