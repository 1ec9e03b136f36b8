"""benchmarks/audit_service.py: the registry and model list it hands the service are ones the
service accepts, and its comparison of two audits finds every decision that differs."""

from __future__ import annotations

import json

import pytest

from benchmarks import audit_service as bench
from benchmarks.audit_set import audit_set, reference
from tests.paths import require_shared_data


@pytest.fixture(scope="module")
def models():
    require_shared_data("dreambooth-subjects")
    return audit_set()


def test_registry_names_every_model_of_the_set_as_a_fine_tune_of_demo_base(models, tmp_path):
    from cgidm.registry import load_registry
    from cgidm_core.audit import parse_models

    path = tmp_path / "registry.json"
    path.write_text(json.dumps(bench.service_registry(models)))
    registry = load_registry(path)
    listed = parse_models(bench.service_model_list(models))
    assert len(listed) == len(models) == 50
    for spec, model in zip(listed, models, strict=True):
        base, tuned = registry.check_pair(spec.pretrained, spec.finetuned)  # ids, not paths
        assert base.id == "demo-base" and tuned.path == str(reference(model))
        assert (tuned.kind == "lora") == (model.kind == "lora")
    # the command line's list names the same models by path, in the same order
    assert [m["finetuned"] for m in bench.cli_model_list(models)] == \
        [str(reference(m)) for m in models]


def _document(p_values: dict[str, float], flagged: set[str]) -> dict:
    ranked = sorted(p_values, key=p_values.get)
    return {"models": [{"finetuned": name, "rank": i + 1, "tier": "full", "p_value": p,
                        "q_value": p * 2, "screen_p_value": p / 2, "flagged": name in flagged,
                        "seconds": 10.0, "screen_seconds": 2.0}
                       for i, (name, p) in enumerate((n, p_values[n]) for n in ranked)]}


def test_outcome_counts_false_hits_and_differences_name_each_changed_decision():
    member = {"a": True, "b": True, "c": False}
    first = bench.outcome(_document({"a": 0.001, "b": 0.01, "c": 0.5}, {"a", "b"}), {}, member)
    assert first["member_ranks"] == [1, 2] and first["fdr"] == 0.0
    assert bench.differences(first, first) == []
    second = bench.outcome(_document({"a": 0.001, "b": 0.6, "c": 0.5}, {"a", "c"}), {}, member)
    assert second["false_hits"] == ["c"] and second["fdr"] == 0.5
    assert second["members_missed"] == ["b"]
    found = bench.differences(first, second)
    assert "b: rank 2 vs 3" in found and "c: flagged False vs True" in found
    assert any(line.startswith("b: p_value 0.01 vs 0.6") for line in found)
    rates = bench.tier_rates(_document({"a": 0.1, "b": 0.2}, set()), wall=30.0)
    assert rates["screen_s_per_model"] == 2.0 and rates["full_s_per_model"] == 8.0
    assert rates["other_seconds"] == 10.0
    # two workers: their model times overlap in wall time, so the rest is of 2 x 30 worker-s
    two = bench.tier_rates(_document({"a": 0.1, "b": 0.2}, set()), wall=15.0, workers=2)
    assert two["other_seconds"] == 10.0 and two["wall_s_per_model"] == 7.5
