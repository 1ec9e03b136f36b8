"""The one evidence document (cgidm_core.evidence) and the surfaces that write it."""

import json

import numpy as np
import pytest
from PIL import Image

from cgidm_core.errors import ConfigError
from cgidm_core.evidence import (
    DEFAULT_EVIDENCE,
    MissingEvidence,
    build_evidence,
    component_value,
    component_values,
    evidence_scores,
)
from cgidm_core.stats import controls_test
from tests.paths import SHARED_DATA

VANGOGH = SHARED_DATA / "wikiart-vangogh"


def _record(name: str, rng: np.random.Generator, shift: float = 0.0) -> dict:
    return {"name": name, "score": float(rng.normal() + shift),
            "metrics": {"ssim": float(rng.normal() + shift), "psnr": float(rng.normal() + shift),
                        "mse": 1.0},
            "attack_scores": {"loss": float(rng.normal() + shift),
                              "contrast": float(rng.normal() + shift),
                              "contrast64": float(rng.normal() + shift)},
            "inversion_scores": {"objective_second_half": float(rng.normal() + shift),
                                 "progress": float(rng.normal() + shift)}}


def _zs(values: list[float]) -> np.ndarray:
    arr = np.asarray(values)
    return (arr - arr.mean()) / arr.std()


def test_fused_score_is_the_sum_of_pooled_zscores():
    rng = np.random.default_rng(0)
    records = [_record(f"i{i}", rng) for i in range(7)]
    expected = sum(_zs([r[src][key] for r in records]) for src, key in (
        ("metrics", "ssim"), ("metrics", "psnr"), ("attack_scores", "loss"),
        ("attack_scores", "contrast")))
    assert evidence_scores(records, "fused") == pytest.approx(list(expected))


def test_paired_score_is_the_sum_of_pooled_zscores_of_shared_contrast_and_progress():
    rng = np.random.default_rng(0)
    records = [_record(f"i{i}", rng) for i in range(7)]
    expected = (_zs([r["attack_scores"]["contrast64"] for r in records])
                + _zs([r["inversion_scores"]["progress"] for r in records]))
    assert evidence_scores(records) == pytest.approx(list(expected))
    previous = (_zs([r["inversion_scores"]["objective_second_half"] for r in records])
                + _zs([r["attack_scores"]["contrast"] for r in records]))
    assert evidence_scores(records, "objective+contrast") == pytest.approx(list(previous))


def test_component_values_are_the_raw_parts_the_verdict_standardises():
    rng = np.random.default_rng(1)
    record = _record("i", rng)
    assert component_value(record, "attack:contrast") == record["attack_scores"]["contrast"]
    assert component_values(record, "paired") == [
        record["attack_scores"]["contrast64"], record["inversion_scores"]["progress"]]
    assert component_values(record, "fused")[:2] == [record["metrics"]["ssim"],
                                                      record["metrics"]["psnr"]]
    with pytest.raises(ConfigError, match="unknown evidence component 'clip:x'"):
        component_value(record, "clip:x")
    with pytest.raises(ConfigError, match="not a fusion"):
        component_values(record, "similarity")
    record["inversion_scores"] = {}
    with pytest.raises(MissingEvidence, match="progress"):
        component_values(record)


def test_a_record_from_before_the_progress_falls_back_to_the_previous_paired_score():
    """Records written before 2026-12-08 hold no progress and no shared-draw contrast: their
    verdict rests on the previous paired score, and the document says so."""
    rng = np.random.default_rng(6)
    images = [_record(f"m{i}", rng, shift=1.0) for i in range(3)]
    controls = [_record(f"c{i}", rng) for i in range(19)]
    for record in images + controls:
        del record["inversion_scores"]["progress"], record["attack_scores"]["contrast64"]
    doc = build_evidence(images, controls)
    assert doc["evidence"]["score"] == "objective+contrast"
    assert doc["evidence"]["fallback_from"] == "paired"
    assert "contrast64" in doc["evidence"]["fallback_reason"]
    assert [r["evidence_score"] for r in doc["images"] + doc["controls"]] == pytest.approx(
        evidence_scores([*images, *controls], "objective+contrast"))


def test_document_with_controls_has_p_values_verdicts_and_the_set_test_from_one_score():
    rng = np.random.default_rng(1)
    images = [_record(f"m{i}", rng, shift=2.0) for i in range(4)]
    controls = [_record(f"c{i}", rng) for i in range(19)]
    doc = build_evidence(images, controls, alpha=0.05, settings={"steps": 3})
    scores = evidence_scores([*images, *controls])
    expected = controls_test(scores[:4], scores[4:], alpha=0.05)
    assert [r["p_value"] for r in doc["images"]] == pytest.approx(expected.p_values)
    assert [r["verdict"] for r in doc["images"]] == expected.verdicts
    assert doc["set_test"] == expected.to_dict()
    assert [r["evidence_score"] for r in doc["images"] + doc["controls"]] == pytest.approx(scores)
    assert doc["evidence"]["score"] == DEFAULT_EVIDENCE == "paired"
    assert doc["evidence"]["components"] == ["attack:contrast64", "inversion:progress"]
    assert doc["settings"] == {"steps": 3}
    # the records given are not changed; the document holds copies with the new keys
    assert "p_value" not in images[0] and "evidence_score" not in controls[0]


def test_pooled_standardisation_is_symmetric_so_p_values_stay_valid():
    """Swapping an image with a control changes no image's score: the pooled z-scores are a
    symmetric function of all images, so an image exchangeable with the controls keeps an
    exactly valid empirical p-value."""
    rng = np.random.default_rng(2)
    images = [_record(f"m{i}", rng) for i in range(3)]
    controls = [_record(f"c{i}", rng) for i in range(5)]
    before = dict(zip([r["name"] for r in images + controls],
                      evidence_scores(images + controls), strict=True))
    swapped = [controls[0], *images[1:]] + [images[0], *controls[1:]]
    after = dict(zip([r["name"] for r in swapped], evidence_scores(swapped), strict=True))
    assert after == pytest.approx(before)


def test_without_controls_there_is_no_verdict():
    rng = np.random.default_rng(3)
    doc = build_evidence([_record("a", rng)], [])
    assert doc["set_test"] is None and doc["controls"] == []
    assert "verdict" not in doc["images"][0] and "evidence_score" not in doc["images"][0]


def test_similarity_evidence_is_the_former_verdict():
    rng = np.random.default_rng(4)
    images = [_record(f"m{i}", rng) for i in range(2)]
    controls = [_record(f"c{i}", rng) for i in range(3)]
    doc = build_evidence(images, controls, evidence="similarity")
    expected = controls_test([r["score"] for r in images], [r["score"] for r in controls])
    assert [r["p_value"] for r in doc["images"]] == expected.p_values
    assert all(r["verdict"] == "inconclusive" for r in doc["images"])  # 3 controls


def test_a_missing_component_names_the_image_and_falls_back_to_the_similarity():
    rng = np.random.default_rng(5)
    broken = _record("no-contrast", rng)
    broken["attack_scores"]["contrast"] = None  # not finite in float16: JSON null
    broken["attack_scores"]["contrast64"] = None
    controls = [_record("c", rng)]
    with pytest.raises(ConfigError, match="no-contrast.*'contrast64'.*evidence='similarity'"):
        evidence_scores([broken, *controls])
    # paired, the previous paired score and the contrast alone: every one needs a contrast
    doc = build_evidence([broken], controls)
    assert doc["evidence"]["score"] == "similarity"
    assert doc["evidence"]["fallback_from"] == "paired"
    assert "no-contrast" in doc["evidence"]["fallback_reason"]
    expected = controls_test([broken["score"]], [controls[0]["score"]])
    assert doc["images"][0]["p_value"] == expected.p_values[0]
    with pytest.raises(ConfigError, match="unknown evidence"):
        build_evidence([broken], controls, evidence="clip")


def test_authenticate_records_the_attack_scores_eval_computes(tiny_ddpm_pair):
    """The loss attack and contrast the verdict fuses are the same values `cgidm eval` and the
    benchmark suite compute for those methods (same per-image seeds), whatever the batch."""
    from cgidm_core.api import authenticate, load_pair
    from cgidm_core.evaluation import score_images
    from cgidm_core.inversion import InversionConfig

    pre, ft = tiny_ddpm_pair
    pair = load_pair(pre, ft)
    paths = sorted((VANGOGH / "membership").glob("*.jpg"))[:3]
    results = authenticate(pair, paths, config=InversionConfig(steps=2, seed=3), batch_size=2)
    for method in ("loss", "contrast", "contrast64"):
        expected = score_images(pair, paths, method, seed=3, batch_size=3)
        got = [r.extra["attack_scores"][method] for r in results]
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    skipped = authenticate(pair, paths[:1], config=InversionConfig(steps=2), attack_scores=())
    assert "attack_scores" not in skipped[0].extra


def test_check_verdicts_rest_on_the_evidence_score(tiny_ddpm_pair, tmp_path, capsys):
    from cgidm.cli import main

    pre, ft = tiny_ddpm_pair
    members = sorted((VANGOGH / "membership").glob("*.jpg"))[:2]
    controls = tmp_path / "controls"
    controls.mkdir()
    for path in sorted((VANGOGH / "hold_out").glob("*.jpg"))[:3]:
        Image.open(path).save(controls / (path.stem + ".png"))
    out = tmp_path / "out"
    assert main(["check", "--pretrained", str(pre), "--finetuned", str(ft), "--steps", "2",
                 "--controls", str(controls), "--out", str(out), *map(str, members)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["evidence"]["score"] == "paired"
    control_scores = [c["evidence_score"] for c in doc["controls"]]
    for record in doc["images"]:
        assert set(record["attack_scores"]) == {"loss", "contrast", "contrast64"}
        expected = (1 + sum(c >= record["evidence_score"] for c in control_scores)) / 4
        assert record["p_value"] == pytest.approx(expected)
    assert doc["set_test"]["p_values"] == [r["p_value"] for r in doc["images"]]
    printed = capsys.readouterr().out
    assert "evidence score the p-values and verdicts rest on" in printed
    # 2 images and 3 controls cannot decide: the power table's advice, printed and recorded
    assert "too few to decide (2 images, 3 controls" in doc["evidence"]["too_small_to_decide"]
    assert "note: too few to decide (2 images, 3 controls" in printed
    # the table's score column is the evidence score (one score everywhere), similarity beside
    for record in doc["images"] + doc["controls"]:
        row = next(line for line in printed.splitlines() if line.startswith(record["name"]))
        shown, similarity = (float(v) for v in row.split()[1:3])
        assert shown == pytest.approx(record["evidence_score"], abs=1e-4)
        assert similarity == pytest.approx(record["score"], abs=1e-4)


def test_eval_evidence_method_scores_like_the_verdict(tiny_ddpm_pair, tmp_path):
    """`cgidm eval --method evidence` measures the score check and the service decide by, and
    its controls tests are the evidence document's set test."""
    from cgidm.cli import main

    pre, ft = tiny_ddpm_pair
    folders = {}
    for name, src, n in (("members", "membership", 2), ("holdout", "hold_out", 2),
                         ("controls", "hold_out", 5)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        files = sorted((VANGOGH / src).glob("*.jpg"))
        for path in (files[:n] if name != "controls" else files[2:2 + n]):
            Image.open(path).save(folders[name] / (path.stem + ".png"))
    out_json = tmp_path / "evidence.json"
    assert main(["eval", "--pretrained", str(pre), "--finetuned", str(ft), "--members",
                 str(folders["members"]), "--holdout", str(folders["holdout"]), "--controls",
                 str(folders["controls"]), "--method", "evidence", "--steps", "2",
                 "--n-bootstrap", "20", "--json", str(out_json)]) == 0
    doc = json.loads(out_json.read_text())
    records = doc["images"]
    assert [r["score"] for r in records] == pytest.approx(evidence_scores(records))
    assert doc["settings"]["evidence"]["score"] == "paired"
    members = [r for r in records if r["set"] == "member"]
    controls = [r for r in records if r["set"] == "control"]
    expected = controls_test([r["score"] for r in members], [r["score"] for r in controls])
    assert doc["controls_test"]["members_vs_controls"] == expected.to_dict()
    assert [r["p_value"] for r in members] == expected.p_values
