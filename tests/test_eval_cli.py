"""`cgidm eval` end to end on a tiny pixel-space pair with images written to temporary folders."""

import json

import numpy as np
import pytest
from PIL import Image

from cgidm.cli import main
from cgidm_core.names import DEFAULT_METRIC


def write_images(folder, count: int, seed: int, size: int = 24):
    """Smooth random pictures saved as PNG (bigger than the pair's 16 px: eval resizes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        low = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(low).resize((size, size), Image.Resampling.BILINEAR).save(
            folder / f"img{i:02d}.png"
        )
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-data")
    return (
        write_images(root / "members", 3, seed=1),
        write_images(root / "holdout", 3, seed=2),
        write_images(root / "controls", 4, seed=3),
    )


def model_args(tiny_ddpm_pair):
    pre, ft = tiny_ddpm_pair
    return ["--pretrained", str(pre), "--finetuned", str(ft)]


def test_eval_cgidm_writes_json_with_auc_and_a_png_plot(tiny_ddpm_pair, folders, tmp_path, capsys):
    members, holdout, _ = folders
    out_json, out_png = tmp_path / "r" / "eval.json", tmp_path / "roc.png"
    code = main([
        "eval", *model_args(tiny_ddpm_pair), "--members", str(members), "--holdout",
        str(holdout), "--method", "cgidm", "--steps", "2", "--seed", "1", "--batch-size", "4",
        "--n-bootstrap", "200", "--json", str(out_json), "--plot", str(out_png),
    ])
    assert code == 0
    doc = json.loads(out_json.read_text())
    assert isinstance(doc["auc"], float) and 0.0 <= doc["auc"] <= 1.0
    assert doc["method"] == "cgidm"
    assert doc["settings"]["inversion"]["steps"] == 2
    assert [r["set"] for r in doc["images"]] == ["member"] * 3 + ["holdout"] * 3
    assert [r["name"] for r in doc["images"][:3]] == ["img00.png", "img01.png", "img02.png"]
    for record in doc["images"]:
        assert set(record["metrics"]) >= {"ssim", "psnr", "mse"}
        assert record["score"] == pytest.approx(record["metrics"][DEFAULT_METRIC])
    report = doc["report"]
    assert report["auc"] == doc["auc"]
    assert all(item["tpr"] is None for item in report["tpr_at_fpr"])  # only 3 hold-out images
    assert "oracle_best_accuracy" in report
    with Image.open(out_png) as image:
        assert image.format == "PNG" and image.width > 300
    printed = capsys.readouterr().out
    assert "AUC" in printed and "oracle best accuracy" in printed
    assert "chosen on these same scores" in printed
    assert "needs at least 20 non-members" in printed


def test_eval_measures_the_verdicts_score_unless_asked_otherwise(tiny_ddpm_pair, folders,
                                                                 tmp_path, capsys):
    """One score everywhere: `cgidm eval` without --method measures the score cgidm check and the
    service decide by (evidence), not the recovery's similarity."""
    members, holdout, _ = folders
    out_json = tmp_path / "default.json"
    assert main(["eval", *model_args(tiny_ddpm_pair), "--members", str(members), "--holdout",
                 str(holdout), "--steps", "2", "--n-bootstrap", "20", "--json",
                 str(out_json)]) == 0
    doc = json.loads(out_json.read_text())
    assert doc["method"] == "evidence" and doc["settings"]["evidence"]["score"] == "paired"
    assert "method: evidence" in capsys.readouterr().out


def test_eval_baseline_with_calibrated_split_and_controls(tiny_ddpm_pair, folders, tmp_path):
    members, holdout, controls = folders
    out_json = tmp_path / "eval.json"
    code = main([
        "eval", *model_args(tiny_ddpm_pair), "--members", str(members), "--holdout",
        str(holdout), "--method", "loss", "--controls", str(controls), "--calibrate-split",
        "--repeats", "10", "--n-bootstrap", "100", "--json", str(out_json),
    ])
    assert code == 0
    doc = json.loads(out_json.read_text())
    scores = {r["set"]: [] for r in doc["images"]}
    for r in doc["images"]:
        scores[r["set"]].append(r["score"])
    assert len(scores["control"]) == 4
    from cgidm_core.stats import controls_test, evaluate_scores

    assert doc["auc"] == pytest.approx(evaluate_scores(scores["member"], scores["holdout"]).auc)
    test = doc["controls_test"]["members_vs_controls"]
    assert test["p_values"] == pytest.approx(
        controls_test(scores["member"], scores["control"]).p_values
    )
    member_records = [r for r in doc["images"] if r["set"] == "member"]
    assert [r["p_value"] for r in member_records] == test["p_values"]
    split = doc["calibrated_split"]
    assert split["repeats"] == 10 and 0 <= split["fpr_mean"] <= 1
    assert "inversion" not in doc["settings"]


def test_eval_combined_is_the_sum_of_pooled_z_scores(tiny_ddpm_pair, folders, tmp_path):
    members, holdout, _ = folders
    out_json = tmp_path / "eval.json"
    code = main([
        "eval", *model_args(tiny_ddpm_pair), "--members", str(members), "--holdout",
        str(holdout), "--method", "combined", "--steps", "2", "--n-bootstrap", "50",
        "--json", str(out_json),
    ])
    assert code == 0
    records = json.loads(out_json.read_text())["images"]
    sim = np.array([r["cgidm_score"] for r in records])
    con = np.array([r["contrast_score"] for r in records])
    expected = (sim - sim.mean()) / sim.std() + (con - con.mean()) / con.std()
    assert [r["score"] for r in records] == pytest.approx(expected.tolist())


def test_eval_fused_adds_the_pooled_z_scored_loss_attack(tiny_ddpm_pair, folders, tmp_path):
    members, holdout, _ = folders
    out_json = tmp_path / "fused.json"
    code = main([
        "eval", *model_args(tiny_ddpm_pair), "--members", str(members), "--holdout",
        str(holdout), "--method", "fused", "--steps", "2", "--n-bootstrap", "50",
        "--json", str(out_json),
    ])
    assert code == 0
    doc = json.loads(out_json.read_text())
    records = doc["images"]
    sim = np.array([r["cgidm_score"] for r in records])
    loss = np.array([r["loss_score"] for r in records])
    expected = (sim - sim.mean()) / sim.std() + (loss - loss.mean()) / loss.std()
    assert [r["score"] for r in records] == pytest.approx(expected.tolist())
    assert "loss" in doc["settings"]["combination"]


@pytest.mark.parametrize("problem", ["missing", "empty", "file"])
def test_bad_folder_fails_with_one_clear_line(tiny_ddpm_pair, folders, tmp_path, capsys, problem):
    members, _, _ = folders
    bad = tmp_path / "nope"
    if problem == "empty":
        bad.mkdir()
    elif problem == "file":
        bad.write_text("not a folder")
    code = main([
        "eval", *model_args(tiny_ddpm_pair), "--members", str(members), "--holdout", str(bad),
        "--method", "loss",
    ])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("cgidm: error:") and str(bad) in err[0]


def test_score_images_matches_the_baseline_on_encoded_pixels(tiny_ddpm_pair, folders):
    """The library entry point: same preprocessing, encoding and per-image seeds as by hand."""

    from cgidm_core.baselines import loss_attack
    from cgidm_core.errors import ConfigError
    from cgidm_core.evaluation import score_images
    from cgidm_core.images import image_seed, load_image_folder, to_tensor
    from cgidm_core.models import load_pair_from_paths

    pair = load_pair_from_paths(*tiny_ddpm_pair, device="cpu")
    names, pictures = load_image_folder(folders[0])
    assert names == ["img00.png", "img01.png", "img02.png"]
    scores = score_images(pair, pictures, "loss", seed=4, batch_size=2)
    tensor = to_tensor(pictures, pair.image_size)
    expected = loss_attack(
        pair, pair.encode(tensor), pair.conditioning(None), seeds=[image_seed(x, 4) for x in tensor]
    )
    assert scores == pytest.approx(expected.tolist(), rel=1e-5)
    with pytest.raises(ConfigError, match="unknown method"):
        score_images(pair, pictures, "magic")
    with pytest.raises(ConfigError, match="no images"):
        score_images(pair, [], "loss")


def test_bad_setting_fails_before_any_scoring(folders, capsys):
    members, holdout, _ = folders
    code = main([
        "eval", "--pretrained", "no-such-model", "--finetuned", "no-such-model", "--members",
        str(members), "--holdout", str(holdout), "--target-fpr", "5",
    ])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--target-fpr must be between 0 and 1" in err[0]
