"""Leave-one-group-out choice (cgidm_core.held_out) on AUC tables whose answer is known."""

import pytest

from cgidm_core.errors import ConfigError
from cgidm_core.held_out import choose, leave_one_group_out

GROUPS = {"a1": "A", "a2": "A", "b1": "B", "b2": "B", "c1": "C", "c2": "C"}


def test_a_score_that_wins_only_in_one_group_is_not_chosen_for_that_group():
    """`special` is perfect on group C and useless elsewhere; `steady` is good everywhere and
    best on A and B. In-sample (all groups), steady wins by its worst case. Left out, C must
    be measured by what A + B chose (steady), never by special, which only C favours."""
    aucs = {
        "steady": {"a1": 0.95, "a2": 0.93, "b1": 0.94, "b2": 0.92, "c1": 0.80, "c2": 0.82},
        "special": {"a1": 0.60, "a2": 0.55, "b1": 0.50, "b2": 0.58, "c1": 1.00, "c2": 1.00},
        "middle": {"a1": 0.85, "a2": 0.86, "b1": 0.84, "b2": 0.85, "c1": 0.85, "c2": 0.84},
    }
    report = leave_one_group_out(aucs, GROUPS)
    by_group = {f.group: f for f in report.folds}
    assert by_group["C"].chosen == "steady"  # chosen on A and B (worst 0.92 > 0.84)
    assert by_group["C"].aucs == (0.80, 0.82)
    # without A (or B), the worst case on the rest is C's: middle (0.84) beats steady (0.80)
    assert by_group["A"].chosen == "middle" and by_group["B"].chosen == "middle"
    assert report.held_out_worst == 0.80
    assert report.held_out_mean == pytest.approx(round((0.85 + 0.86 + 0.84 + 0.85 + 0.80
                                                        + 0.82) / 6, 3))
    # in-sample: middle has the best worst case over all six pairs (0.84)
    assert (report.in_sample_choice, report.in_sample_worst) == ("middle", 0.84)


def test_ties_go_to_the_better_mean_then_the_cheaper():
    aucs = {"x": {"a1": 0.9, "b1": 1.0}, "y": {"a1": 0.9, "b1": 0.95},
            "z": {"a1": 0.9, "b1": 1.0}}
    assert choose(aucs, ["a1", "b1"], {"x": 600, "y": 3, "z": 16})[0] == "z"


def test_bootstrap_intervals_bracket_the_held_out_numbers_when_scores_are_given():
    members, others = [0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.65, 0.3]  # AUC 15/16
    aucs = {"s": {p: 15 / 16 for p in GROUPS}, "t": {p: 0.5 for p in GROUPS}}
    scores = {"s": {p: (members, others) for p in GROUPS}}
    report = leave_one_group_out(aucs, GROUPS, scores=scores, n_bootstrap=200, seed=1)
    assert all(f.chosen == "s" for f in report.folds)
    lo, hi = report.held_out_mean_ci
    assert lo <= report.held_out_mean <= hi and hi <= 1.0
    assert report.held_out_worst_ci[0] <= report.held_out_worst_ci[1] <= 1.0
    assert report.to_dict()["folds"][0]["worst"] == pytest.approx(15 / 16)


def test_one_group_or_no_complete_candidate_is_refused():
    with pytest.raises(ConfigError, match="at least two groups"):
        leave_one_group_out({"s": {"a1": 0.9}}, {"a1": "A"})
    with pytest.raises(ConfigError, match="every pair"):
        leave_one_group_out({"s": {"a1": 0.9}}, {"a1": "A", "b1": "B"})
