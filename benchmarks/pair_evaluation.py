"""One pair's cached raw values turned into every candidate score's AUC (and TPR at low FPR).

Its own module because both the suite (``benchmarks.suite``) and the null controls
(``benchmarks.null_controls``) score pairs this way, and the suite reads the null controls: kept
in either, the two benchmark modules would import each other.
"""

from __future__ import annotations


def pair_slice(document: dict, holdout: str) -> tuple[dict[str, list[float]], int, int]:
    """Raw values of the members and one hold-out set, and the two counts."""
    n1 = document["n_members"]
    start = n1
    for name, count in document["holdouts"].items():
        if name == holdout:
            break
        start += count
    n0 = document["holdouts"][holdout]
    idx = list(range(n1)) + list(range(start, start + n0))
    return {k: [v[i] for i in idx] for k, v in document["values"].items()}, n1, n0


def null_slice(document: dict, holdout: str) -> dict[str, list[float]] | None:
    """The null values (``document["null"]``, aligned with its files; set by the caller from
    ``benchmarks.null_controls``) of the members and one hold-out set, or None."""
    if not document.get("null"):
        return None
    values, _n1, _n0 = pair_slice({**document, "values": document["null"]}, holdout)
    return values


def evaluate_pair(document: dict, pair, n_bootstrap: int,
                  candidates: tuple[str, ...] | None = None) -> dict:
    """AUC [CI] and TPR at FPR = 1/n_holdout of every candidate (or of ``candidates``) on one
    pair; the inversion's step count is the one the values were recorded with."""
    from cgidm_core.inversion import InversionConfig
    from cgidm_core.stats import evaluate_scores
    from cgidm_core.suite_scores import candidate_scores

    values, n1, n0 = pair_slice(document, pair.holdout)
    fpr = 1.0 / n0
    rows = {}
    scores_of: dict[str, list[list[float]]] = {}
    steps = int((document.get("inversion") or {}).get("steps") or InversionConfig().steps)
    for name, (cand, scores) in candidate_scores(values, steps,
                                                 null_slice(document, pair.holdout)).items():
        if candidates is not None and name not in candidates:
            continue
        report = evaluate_scores(scores[:n1], scores[n1:], n_bootstrap=n_bootstrap, seed=0,
                                 target_fprs=(fpr,))
        tpr = report.tpr_at_fpr[0]
        rows[name] = {"auc": report.auc, "ci": [report.auc_ci_low, report.auc_ci_high],
                      "tpr": tpr.tpr, "fpr": tpr.achieved_fpr, "target_fpr": fpr,
                      "cost": cand.evaluations, "description": cand.description}
        scores_of[name] = [[float(v) for v in scores[:n1]], [float(v) for v in scores[n1:]]]
    looks = {}
    for key in ("default/final", "default/average", "default/clamped", "palette/final",
                "palette/average", "palette/clamped"):
        for metric in ("ssim", "colour", "saturated"):
            vals = values.get(f"{key}/{metric}")
            if vals:
                looks[f"{key}/{metric}"] = [float(sum(vals[:n1]) / n1),
                                            float(sum(vals[n1:]) / n0)]
    return {"pair": pair.pair_id, "n_members": n1, "n_holdout": n0, "rows": rows,
            "looks": looks, "group": pair.recipe_group, "family": pair.family,
            "strength": pair.strength, "scores": scores_of}
