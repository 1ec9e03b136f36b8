"""`cgidm audit` end to end on the shipped demo pair, a model equal to its base, and the real
paintings: the member model is flagged at the top, the non-member model is not."""

from __future__ import annotations

import json

import pytest

from cgidm.cli import main
from cgidm_testkit.audit_family import make_perturbed
from tests.paths import require_shared_data


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    vangogh = require_shared_data("wikiart-vangogh")
    out = tmp_path_factory.mktemp("audit")
    models = out / "models.json"
    # demo-base with noise on its weights: it differs from its base but never saw a painting
    other = make_perturbed(seed=1, cache=out / "family")
    models.write_text(json.dumps([
        {"pretrained": "demo-base", "finetuned": str(other)},
        {"pretrained": "demo-base", "finetuned": "demo-vangogh"},  # fine-tuned on the members
    ]))
    # five members and five hold-outs keep it quick; the decision still has room (below)
    images = [a for p in sorted((vangogh / "membership").iterdir())[:5]
              for a in ("--images", str(p))]
    controls = [a for p in sorted((vangogh / "hold_out").iterdir())[:5]
                for a in ("--controls", str(p))]
    code = main(["audit", *images, *controls, "--models", str(models),
                 "--out", str(out / "out"), "--steps", "4", "--seed", "0"])
    assert code == 0
    return out / "out", json.loads((out / "out" / "audit.json").read_text())


def test_member_model_is_flagged_first_and_the_base_is_not(audited):
    out, doc = audited
    first, second = doc["models"]
    assert first["finetuned"] == "demo-vangogh" and first["rank"] == 1
    assert first["flagged"] and first["tier"] == "full"
    # 5 members all above 5 hold-outs: exact Mann-Whitney p = 1 / C(10, 5) = 1 / 252; BH over
    # two models with the other p = 1: q = 2 p
    assert first["p_value"] == pytest.approx(1 / 252)
    assert first["q_value"] == pytest.approx(2 / 252)
    assert second["finetuned"].endswith("perturbed-s1-x0.05") and not second["flagged"]
    assert second["q_value"] > 0.05
    assert doc["decision"]["correction"] == "bh" and doc["decision"]["level"] == 0.05
    assert doc["counts"]["models"] == 2 and doc["counts"]["flagged"] == 1


def test_flagged_model_has_per_image_scores_and_pictures(audited):
    out, doc = audited
    first = doc["models"][0]
    assert len(first["images"]) == 5
    for record in first["images"]:
        assert {"evidence_score", "p_value", "screen_score", "attack_scores"} <= set(record)
        pictures = first["pictures"][record["name"]]
        assert (out / pictures["side_by_side"]).is_file()
    assert "pictures" not in doc["models"][1]


def test_bad_model_list_is_one_clear_line(tmp_path, capsys):
    vangogh = require_shared_data("wikiart-vangogh")
    code = main(["audit", "--images", str(vangogh / "membership"),
                 "--controls", str(vangogh / "hold_out"),
                 "--models", '[{"pretrained": "demo-base"}]', "--out", str(tmp_path)])
    assert code == 2
    assert "models[0].finetuned must be a non-empty string" in capsys.readouterr().err
