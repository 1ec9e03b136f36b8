"""Statistics on synthetic scores whose answers are known in advance."""

import math

import numpy as np
import pytest
from PIL import Image
from scipy import stats as sps

from cgidm_core.errors import ConfigError
from cgidm_core.stats import (
    INCONCLUSIVE,
    MEMBER_EVIDENCE,
    NO_EVIDENCE,
    calibrated_split,
    controls_test,
    empirical_p_value,
    evaluate_scores,
    min_nonmembers_for_fpr,
    plot_report,
)

SEPARATED_MEMBERS = [6.0, 7.0, 8.0, 9.0, 10.0]
SEPARATED_NONMEMBERS = [1.0, 2.0, 3.0, 4.0, 5.0]


# ------------------------------------------------------------------ empirical p-values


def test_empirical_p_value_by_hand():
    controls = [1.0, 2.0, 3.0, 4.0]
    assert empirical_p_value(10.0, controls) == pytest.approx(1 / 5)  # above all: 1/(n+1)
    assert empirical_p_value(3.5, controls) == pytest.approx(2 / 5)  # one control >= 3.5
    assert empirical_p_value(3.0, controls) == pytest.approx(3 / 5)  # a tie counts against
    assert empirical_p_value(0.0, controls) == pytest.approx(5 / 5)


def test_empirical_p_value_never_zero_and_is_valid_under_the_null():
    rng = np.random.default_rng(0)
    controls = rng.normal(size=19)
    assert empirical_p_value(1e9, controls) == pytest.approx(1 / 20)
    # Suspect exchangeable with fresh controls: P(p <= 0.1) = P(top 2 of 20) = 0.1 exactly.
    p = np.array([
        empirical_p_value(rng.normal(), rng.normal(size=19)) for _ in range(4000)
    ])
    assert p.min() > 0
    assert np.mean(p <= 0.1) == pytest.approx(0.1, abs=0.015)  # 3 binomial standard errors


# ------------------------------------------------------------------ controls test


def test_controls_test_separated_sets():
    test = controls_test(SEPARATED_MEMBERS, SEPARATED_NONMEMBERS + list(range(-20, -5)))
    n0 = 20
    assert test.n_controls == n0 and test.n_suspect == 5
    assert test.p_values == pytest.approx([1 / (n0 + 1)] * 5)
    assert test.verdicts == [MEMBER_EVIDENCE] * 5  # 1/21 <= 0.05
    assert test.auc == 1.0
    assert test.u_statistic == 5 * n0
    assert test.min_reachable_p == pytest.approx(1 / 21)
    exact = sps.mannwhitneyu(
        SEPARATED_MEMBERS, SEPARATED_NONMEMBERS + list(range(-20, -5)),
        alternative="greater", method="exact",
    )
    assert test.test_method == "exact"
    assert test.p_value == pytest.approx(exact.pvalue, rel=1e-12)
    assert test.p_value == pytest.approx(1 / math.comb(25, 5), rel=1e-9)
    doc = test.to_dict()
    assert doc["p_values"] == test.p_values and doc["verdicts"] == test.verdicts


def test_controls_test_u_p_value_equals_scipys_exact_value():
    test = controls_test(SEPARATED_MEMBERS, SEPARATED_NONMEMBERS)
    assert test.p_value == pytest.approx(1 / math.comb(10, 5), rel=1e-12)  # 1/252


def test_few_controls_cannot_give_member_evidence_and_say_so():
    test = controls_test([100.0, 200.0], [1.0, 2.0, 3.0, 4.0, 5.0], alpha=0.05)
    assert test.p_values == pytest.approx([1 / 6, 1 / 6])
    assert test.verdicts == [INCONCLUSIVE, INCONCLUSIVE]
    assert "1/(5+1)" in test.explanation
    assert "inconclusive" in test.explanation
    assert "no single image" in test.explanation


def test_verdicts_decide_from_exactly_enough_controls():
    # 19 controls at alpha 0.05: 1/(19+1) = 0.05 is reachable, so verdicts are decided; 18 are not.
    controls = [float(c) for c in range(19)]
    decided = controls_test([100.0, 5.0], controls, alpha=0.05)
    assert decided.verdicts == [MEMBER_EVIDENCE, NO_EVIDENCE]
    undecided = controls_test([100.0, 5.0], controls[:18], alpha=0.05)
    assert undecided.verdicts == [INCONCLUSIVE, INCONCLUSIVE]
    assert "19 known non-member images (1 more)" in undecided.explanation


def test_controls_test_mixed_verdicts_and_ties():
    controls = list(range(1, 40))  # 39 controls: smallest p = 1/40 = 0.025
    test = controls_test([100.0, 38.0, 39.0, 20.0], controls, alpha=0.05)
    # 100: no control >= it; 38: controls 38, 39; 39: control 39 (a tie); 20: controls 20..39
    assert test.p_values == pytest.approx([1 / 40, 3 / 40, 2 / 40, 21 / 40])
    assert test.verdicts == [MEMBER_EVIDENCE, NO_EVIDENCE, MEMBER_EVIDENCE, NO_EVIDENCE]
    assert test.test_method == "asymptotic"  # ties between suspects and controls
    expected = sps.mannwhitneyu([100.0, 38.0, 39.0, 20.0], controls, alternative="greater")
    assert test.p_value == pytest.approx(expected.pvalue)


@pytest.mark.parametrize(
    "suspects, controls",
    [([], [1.0]), ([1.0], []), ([float("nan")], [1.0, 2.0]), ([1.0], [2.0, float("inf")])],
)
def test_controls_test_rejects_empty_and_nan(suspects, controls):
    with pytest.raises(ConfigError):
        controls_test(suspects, controls)


def test_bad_alpha_is_a_config_error():
    with pytest.raises(ConfigError, match="alpha"):
        controls_test([1.0], [0.0], alpha=1.5)


# ------------------------------------------------------------------ evaluate_scores


def test_perfectly_separated_sets():
    report = evaluate_scores(SEPARATED_MEMBERS, SEPARATED_NONMEMBERS, n_bootstrap=500)
    assert report.auc == 1.0
    assert report.auc_ci_low == 1.0 and report.auc_ci_high == 1.0
    assert report.oracle_best_accuracy == 1.0
    assert 5.0 < report.oracle_threshold <= 6.0
    assert report.roc_fpr[0] == 0.0 and report.roc_tpr[-1] == 1.0
    assert report.roc_thresholds[0] is None  # the +infinity point


def test_reversed_sets_have_auc_zero():
    report = evaluate_scores(SEPARATED_NONMEMBERS, SEPARATED_MEMBERS, n_bootstrap=0)
    assert report.auc == 0.0
    assert report.auc_ci_low is None and "disabled" in report.ci_note


def test_identical_distributions_interval_covers_half():
    rng = np.random.default_rng(1)
    report = evaluate_scores(rng.normal(size=60), rng.normal(size=60), n_bootstrap=1000, seed=3)
    assert abs(report.auc - 0.5) < 0.12
    assert report.auc_ci_low < 0.5 < report.auc_ci_high
    assert report.auc_ci_high - report.auc_ci_low < 0.4


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(2)
    m, n = rng.normal(0.5, 1, 30), rng.normal(0, 1, 30)
    a = evaluate_scores(m, n, n_bootstrap=300, seed=7)
    b = evaluate_scores(m, n, n_bootstrap=300, seed=7)
    c = evaluate_scores(m, n, n_bootstrap=300, seed=8)
    assert (a.auc_ci_low, a.auc_ci_high) == (b.auc_ci_low, b.auc_ci_high)
    assert (a.auc_ci_low, a.auc_ci_high) != (c.auc_ci_low, c.auc_ci_high)


def test_tpr_at_fpr_needs_enough_nonmembers():
    assert min_nonmembers_for_fpr(0.01) == 100 and min_nonmembers_for_fpr(0.05) == 20
    rng = np.random.default_rng(0)
    few = evaluate_scores(rng.normal(2, 1, 10), rng.normal(0, 1, 10), n_bootstrap=0)
    for item in few.tpr_at_fpr:
        assert item.tpr is None and item.threshold is None
        assert "non-members" in item.reason and "10" in item.reason
    many = evaluate_scores(rng.normal(2, 1, 200), rng.normal(0, 1, 200), n_bootstrap=0)
    one, five = many.tpr_for(0.01), many.tpr_for(0.05)
    assert one.tpr is not None and five.tpr is not None and one.reason is None
    assert one.achieved_fpr <= 0.01 and five.achieved_fpr <= 0.05
    assert 0 < one.tpr <= five.tpr <= 1
    # 50 non-members: 5 % is resolvable, 1 % is not
    mid = evaluate_scores(rng.normal(2, 1, 50), rng.normal(0, 1, 50), n_bootstrap=0)
    assert mid.tpr_for(0.05).tpr is not None and mid.tpr_for(0.01).tpr is None


def test_tpr_at_fpr_matches_a_hand_count():
    nonmembers = np.arange(100, dtype=float)  # 0..99
    members = np.array([99.5, 98.5, 97.5, 50.0])
    report = evaluate_scores(members, nonmembers, n_bootstrap=0, target_fprs=(0.01,))
    item = report.tpr_for(0.01)
    # threshold just above 98 lets exactly one non-member (99) through: FPR 1 %, TPR 2/4
    assert item.achieved_fpr == pytest.approx(0.01)
    assert item.tpr == pytest.approx(0.5)


def test_report_to_dict_has_auc_and_is_json_ready():
    import json

    report = evaluate_scores([0.9, 0.8, 0.3], [0.1, 0.2, 0.85], n_bootstrap=200)
    doc = report.to_dict()
    json.dumps(doc, allow_nan=False)
    assert doc["auc"] == pytest.approx(7 / 9)
    assert "oracle_best_accuracy" in doc


@pytest.mark.parametrize("m, n", [([], [1.0]), ([1.0], []), ([1.0, float("nan")], [0.0])])
def test_evaluate_scores_rejects_bad_input(m, n):
    with pytest.raises(ConfigError):
        evaluate_scores(m, n)


# ------------------------------------------------------------------ calibrated split


def test_calibrated_split_reaches_the_target_fpr():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(1.5, 1, 3000), rng.normal(0, 1, 3000)
    split = calibrated_split(members, nonmembers, target_fpr=0.05, seed=0, repeats=40)
    assert split.fpr_mean == pytest.approx(0.05, abs=0.005)
    assert 0 < split.fpr_std < 0.02
    # ... and the TPR the whole sample has at its own 95 % non-member quantile
    assert split.tpr_mean == pytest.approx(np.mean(members > np.quantile(nonmembers, 0.95)),
                                           abs=0.01)
    assert split.note is None
    again = calibrated_split(members, nonmembers, target_fpr=0.05, seed=0, repeats=40)
    assert again == split


def test_calibrated_split_warns_when_halves_are_too_small():
    split = calibrated_split(SEPARATED_MEMBERS, SEPARATED_NONMEMBERS, target_fpr=0.05, repeats=5)
    assert split.n_calibration_nonmembers == 2
    assert split.note is not None and "cannot" in split.note
    assert split.tpr_mean == 1.0  # every member beats every non-member
    # ... yet the threshold (the top calibration non-member) lets other non-members through:
    # with 2 calibration non-members the FPR reached is far above the 5 % aimed at.
    assert split.fpr_mean > 0.05 and split.fpr_over_target_rate > 0


def test_calibrated_split_needs_two_of_each():
    with pytest.raises(ConfigError):
        calibrated_split([1.0], [0.0, 0.5])


# ------------------------------------------------------------------ plot


def test_plot_report_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    m, n = rng.normal(1, 1, 20), rng.normal(0, 1, 20)
    report = evaluate_scores(m, n, n_bootstrap=100)
    path = plot_report(report, m, n, tmp_path / "sub" / "roc.png", title="test")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 400 and image.height > 200
