"""Audit decisions (cgidm_core.audit): multiple-testing control, ranking, the screen rule, the model
list. The numbers are worked by hand in the comments."""

from __future__ import annotations

import pytest

from cgidm_core.audit import (
    SCREEN_CLEAR_P,
    adjust_p_values,
    decide_models,
    needs_full_verdict,
    parse_models,
    screen_scores,
    screen_test,
)
from cgidm_core.errors import ConfigError

# p = 0.01, 0.04, 0.03, 0.20 (m = 4). Sorted: 0.01, 0.03, 0.04, 0.20.
# BH: p_(i) m / i = 0.04, 0.06, 0.0533, 0.20; running minimum from the top:
#     0.04, 0.0533, 0.0533, 0.20  -> in input order 0.04, 0.0533, 0.0533, 0.20.
# Holm: p_(i) (m - i + 1) = 0.04, 0.09, 0.08, 0.20; running maximum from the bottom:
#     0.04, 0.09, 0.09, 0.20      -> in input order 0.04, 0.09, 0.09, 0.20.
# Bonferroni: 4 p = 0.04, 0.16, 0.12, 0.80.
P = [0.01, 0.04, 0.03, 0.20]


def test_bh_q_values_by_hand():
    assert adjust_p_values(P, "bh") == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.20])


def test_holm_and_bonferroni_by_hand():
    assert adjust_p_values(P, "holm") == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert adjust_p_values(P, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.80])


def test_flags_follow_the_level_and_the_correction():
    entries = [{"finetuned": f"m{i}", "p_value": p} for i, p in enumerate(P)]
    at_5 = decide_models(entries, level=0.05)
    assert [m["finetuned"] for m in at_5 if m["flagged"]] == ["m0"]
    # at 0.06 BH flags the three smallest (q 0.04, 0.0533, 0.0533), Holm only one (0.09 > 0.06)
    bh = decide_models(entries, level=0.06)
    assert sorted(m["finetuned"] for m in bh if m["flagged"]) == ["m0", "m1", "m2"]
    holm = decide_models(entries, level=0.06, correction="holm")
    assert [m["finetuned"] for m in holm if m["flagged"]] == ["m0"]


def test_ranking_breaks_ties_by_screen_then_auc_then_order():
    entries = [
        {"finetuned": "cleared-a", "p_value": 1.0, "screen_p_value": 0.7},
        {"finetuned": "weak", "p_value": 0.2, "screen_p_value": 0.1, "auc": 0.6},
        {"finetuned": "cleared-b", "p_value": 1.0, "screen_p_value": 0.4},
        {"finetuned": "strong-low-auc", "p_value": 0.001, "screen_p_value": 0.01, "auc": 0.9},
        {"finetuned": "strong", "p_value": 0.001, "screen_p_value": 0.01, "auc": 1.0},
    ]
    ranked = decide_models(entries)
    assert [m["finetuned"] for m in ranked] == [
        "strong", "strong-low-auc", "weak", "cleared-b", "cleared-a"]
    assert [m["rank"] for m in ranked] == [1, 2, 3, 4, 5]
    assert [m["index"] for m in ranked] == [4, 3, 1, 2, 0]
    # m = 5: q of the two 0.001s is 0.001 * 5 / 2 = 0.0025; the cleared models are never flagged
    assert ranked[0]["q_value"] == pytest.approx(0.0025)
    assert [m["flagged"] for m in ranked] == [True, True, False, False, False]


def test_bad_levels_and_p_values_are_refused():
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        decide_models([{"p_value": 0.1}], level=0)
    with pytest.raises(ConfigError, match="unknown correction"):
        adjust_p_values([0.1], "sidak")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        adjust_p_values([float("nan")])


def test_screen_rule_clears_only_above_the_threshold():
    assert needs_full_verdict(0.01)
    assert needs_full_verdict(SCREEN_CLEAR_P)
    assert not needs_full_verdict(SCREEN_CLEAR_P + 1e-9)


def test_screen_scores_fuse_z_scores_and_ignore_a_constant_contrast():
    # loss 1, 2, 3 -> z = -1.2247, 0, 1.2247; contrast constant (a model equal to its base): 0
    records = [{"name": str(v), "attack_scores": {"loss": v, "contrast": 0.0}} for v in (1, 2, 3)]
    assert screen_scores(records) == pytest.approx([-1.2247449, 0.0, 1.2247449])
    images = [{"name": "a", "attack_scores": {"loss": 5.0, "contrast": 5.0}},
              {"name": "b", "attack_scores": {"loss": 4.0, "contrast": 4.0}}]
    controls = [{"name": f"c{i}", "attack_scores": {"loss": float(i), "contrast": float(i)}}
                for i in range(3)]
    test = screen_test(images, controls)
    # both images above every control: U = 6 of 6, exact one-sided p = 1 / C(5, 2) = 0.1
    assert test["auc"] == 1.0
    assert test["p_value"] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="controls"):
        screen_test(images, [])


def test_model_list_is_validated_with_the_entry_named():
    models = parse_models([{"pretrained": "demo-base", "finetuned": "demo-vangogh"},
                           {"pretrained": "b", "finetuned": "x.safetensors", "prompt": "sks"}])
    assert models[1].prompt == "sks" and models[0].group_key == ("demo-base", None)
    for raw, match in (({}, "JSON list"), ([], "empty"),
                       ([{"pretrained": "a"}], r"models\[0\]\.finetuned"),
                       ([{"pretrained": "a", "finetuned": "b", "extra": 1}], "unknown field"),
                       ([{"pretrained": "a", "finetuned": "b", "prompt": 3}], "prompt"),
                       ([{"pretrained": "a", "finetuned": "b"}] * 3, "at most 2")):
        with pytest.raises(ConfigError, match=match):
            parse_models(raw, max_models=2)


def test_service_groups_models_by_base_in_bounded_subtasks():
    from cgidm.audits import AuditModelSpec, model_groups

    specs = [AuditModelSpec(pretrained=base, finetuned=f"m{i}")
             for i, base in enumerate(["a", "b", "a", "a", "b", "a"])]
    assert model_groups(specs, size=3) == [("a", [0, 2, 3]), ("a", [5]), ("b", [1, 4])]


def test_shared_base_passes_change_no_score_and_are_reused(tiny_ddpm_pair):
    """The second model on a base reuses the base's screen passes (memo hits), and every value is
    exactly what the screen computes without the memo; the pair is given back unpatched."""
    from PIL import Image

    from cgidm_core.api import load_pair
    from cgidm_core.audit import AuditModel
    from cgidm_core.audit_run import AuditSettings, run_audit, screen_records

    pre, ft = tiny_ddpm_pair
    pictures = [Image.new("RGB", (16, 16), (40 * k, 255 - 30 * k, 90)) for k in range(6)]
    names = [f"p{k}" for k in range(6)]
    model = AuditModel(str(pre), str(ft))
    pairs = []

    def load(spec):
        pairs.append(load_pair(spec.pretrained, spec.finetuned))
        return pairs[-1]

    stats: dict[str, int] = {}
    entries = run_audit([model, model], pictures[:3], pictures[3:], names[:3], names[3:], load,
                        AuditSettings(clear_p=0.0), stats=stats)
    assert stats["base_pass_hits"] >= 1 and stats["base_pass_misses"] >= 1
    assert "eps_pretrained" not in vars(pairs[0])  # the memo was detached
    alone = screen_records(pairs[0], pictures, names, None, seed=0)
    for entry in entries:
        assert entry["tier"] == "screen" and entry["p_value"] == 1.0  # clear_p 0 clears all
        assert [r["attack_scores"] for r in entry["images"]] == \
            [r["attack_scores"] for r in alone[:3]]


def test_model_lists_are_validated_without_numpy():
    """The gateway image has no numpy: what POST /audits calls must not need it."""
    import subprocess
    import sys

    code = ("import sys, cgidm_core.audit as a\n"
            "a.parse_models([{'pretrained': 'b', 'finetuned': 'f'}]); a.check_level(0.05)\n"
            "a.decision_settings(0.05, 'bh', a.SCREEN_CLEAR_P)\n"
            "assert 'numpy' not in sys.modules, 'numpy was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_failed_models_are_reported_but_not_ranked_flagged_or_corrected_over():
    """A model that could not be tested keeps its error and a note, comes after the ranked ones
    with no rank, p or q, and is not in the family: the tested models' q-values are those of a
    family without it (BH over 2 models, not 3)."""
    from cgidm_core.audit import ERROR_NOTE, TIER_ERROR, AuditModel, failed_entry

    broken = failed_entry(1, AuditModel("base", "missing/path"),
                          FileNotFoundError("no model at missing/path"))
    assert broken["tier"] == TIER_ERROR and broken["p_value"] is None
    assert broken["error"] == {"code": "FileNotFoundError", "message": "no model at missing/path"}
    entries = [{"index": 0, "p_value": 0.02, "tier": "full"}, broken,
               {"index": 2, "p_value": 0.04, "tier": "full"}]
    ranked = decide_models(entries, level=0.05)
    assert [m["index"] for m in ranked] == [0, 2, 1]
    assert [m["rank"] for m in ranked] == [1, 2, None]
    assert ranked[0]["q_value"] == pytest.approx(0.04) and ranked[1]["q_value"] == \
        pytest.approx(0.04)  # BH over two: with the failed one as p = 1 they would be 0.06
    assert ranked[0]["flagged"] and ranked[1]["flagged"]
    failed = ranked[2]
    assert failed["flagged"] is False and failed["q_value"] is None and failed["p_value"] is None
    assert failed["note"] == ERROR_NOTE and failed["error"]["message"] == "no model at missing/path"
    # only failures: nothing ranked, nothing flagged, no error from the correction
    only = decide_models([broken])
    assert only[0]["rank"] is None and not only[0]["flagged"]


def test_a_memo_of_base_passes_given_back_serves_a_later_call_with_the_same_values(
        tiny_ddpm_pair):
    """The service splits one base's models into several subtasks; a worker hands each the memo
    it kept (worker/audit_swap.base_passes_for): the later call computes no base pass and its
    entries are exactly those of a call with a fresh memo."""
    from PIL import Image

    from cgidm_core.api import load_pair
    from cgidm_core.audit import AuditModel
    from cgidm_core.audit_run import AuditSettings, BasePasses, run_audit

    pre, ft = tiny_ddpm_pair
    pictures = [Image.new("RGB", (16, 16), (40 * k, 255 - 30 * k, 90)) for k in range(6)]
    names = [f"p{k}" for k in range(6)]
    models = [AuditModel(str(pre), str(ft))] * 2
    kept = BasePasses()
    asked = []

    def memo(key):
        asked.append(key)
        return kept

    def run(**kw):
        stats: dict[str, int] = {}
        entries = run_audit(models, pictures[:3], pictures[3:], names[:3], names[3:],
                            lambda spec: load_pair(spec.pretrained, spec.finetuned),
                            AuditSettings(clear_p=0.0), stats=stats, **kw)
        return [{k: v for k, v in e.items() if "seconds" not in k} for e in entries], stats

    fresh, _ = run(indices=[1])
    first, stats_first = run(indices=[0], base_passes=memo)
    second, stats_second = run(indices=[1], base_passes=memo)
    assert asked == [(str(pre), None)] * 2
    assert stats_first["base_pass_misses"] >= 1
    assert stats_second == {"base_pass_hits": stats_first["base_pass_misses"],
                            "base_pass_misses": 0}
    assert second == fresh


def test_the_full_verdict_of_an_audit_rests_on_the_verdicts_own_score(tiny_ddpm_pair):
    """The full tier reuses the screen's loss attack and contrast and computes the cheap score
    the screen does not (the shared-draw contrast): its evidence is the `paired` score of
    `cgidm check`, not a fallback."""
    from PIL import Image

    from cgidm_core.api import authenticate, load_pair
    from cgidm_core.audit import AuditModel
    from cgidm_core.audit_run import AuditSettings, run_audit
    from cgidm_core.inversion import InversionConfig

    pre, ft = tiny_ddpm_pair
    pictures = [Image.new("RGB", (16, 16), (40 * k, 255 - 30 * k, 90)) for k in range(6)]
    names = [f"p{k}" for k in range(6)]
    config = InversionConfig(steps=2)
    [entry] = run_audit([AuditModel(str(pre), str(ft))], pictures[:3], pictures[3:], names[:3],
                        names[3:], lambda spec: load_pair(spec.pretrained, spec.finetuned),
                        AuditSettings(clear_p=1.0, inversion=config))
    assert entry["tier"] == "full"
    assert entry["evidence"]["score"] == "paired" and "fallback_from" not in entry["evidence"]
    checked = authenticate(load_pair(pre, ft), pictures[:3], names=names[:3], config=config)
    for record, alone in zip(entry["images"], checked, strict=True):
        assert record["attack_scores"] == pytest.approx(alone.extra["attack_scores"])
