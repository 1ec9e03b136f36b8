"""The paper's similarity (DINO and CLIP as its evaluation code computes them) and its protocol
(best match over a split, threshold chosen on the test data), on tiny random feature models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from cgidm.cli import main
from cgidm_core.errors import ConfigError
from cgidm_core.images import to_pil
from cgidm_core.paper_protocol import (
    best_match_scores,
    grid_auc,
    grid_best_accuracy,
    paper_protocol,
)
from cgidm_core.similarity import FeatureModel, _resize_short_side_and_centre_crop
from tests.test_eval_cli import model_args, write_images
from tests.test_similarity import _tiny_clip, _tiny_dino


def pictures(n: int, size: int = 48, seed: int = 0) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=gen) * 2 - 1
    return to_pil(torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear"))


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    return _tiny_dino(tmp_path_factory.mktemp("dino") / "dino")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return _tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


# -- the paper's DINO and CLIP embeddings -------------------------------------------------------


def test_dino_is_the_cls_token_of_the_last_four_blocks_after_the_final_norm(dino_folder):
    """Checked against forward hooks on the blocks themselves (DINO's get_intermediate_layers
    applies the final norm to each block's output and keeps token 0)."""
    model = FeatureModel(dino_folder)
    vit = model.model
    captured = []
    blocks = vit.layers if hasattr(vit, "layers") else vit.encoder.layer  # transformers 5 / 4
    hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(
        out[0] if isinstance(out, tuple) else out)) for layer in blocks[-4:]]
    try:
        pics = pictures(2)
        ours = model.embed_pictures(pics)
        expected = torch.cat([vit.layernorm(h)[:, 0] for h in captured], dim=-1)
    finally:
        for hook in hooks:
            hook.remove()
    assert ours.shape == (2, 4 * vit.config.hidden_size)
    assert torch.allclose(ours, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5)
    # one block is the usual CLS embedding (last_hidden_state is already normed)
    single = FeatureModel(dino_folder, dino_last_blocks=1).embed_pictures(pics)
    with torch.no_grad():
        plain = vit(pixel_values=model._dino_pixels(pics)).last_hidden_state[:, 0]
    assert torch.allclose(single, torch.nn.functional.normalize(plain, dim=-1), atol=1e-5)
    with pytest.raises(ConfigError, match="blocks"):
        FeatureModel(dino_folder, dino_last_blocks=99)


def test_dino_preprocessing_is_resize_256_and_centre_crop_224(tmp_path):
    model = FeatureModel(_tiny_dino(tmp_path / "dino224", image_size=224))
    assert (model.resize, model.crop) == (256, 224)
    wide = Image.new("RGB", (300, 200), "white")
    wide.paste(Image.new("RGB", (60, 200), "black"), (0, 0))  # a dark left band, cut by the crop
    out = _resize_short_side_and_centre_crop(wide, 256, 224)
    expected = wide.resize((384, 256), Image.Resampling.BICUBIC).crop((80, 16, 304, 240))
    assert out.size == (224, 224)
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    assert model._dino_pixels([wide]).shape == (1, 3, 224, 224)
    assert "resize 256, centre crop 224" in model.describe()["preprocessing"]


def test_clip_gives_the_projected_image_embedding(clip_folder):
    model = FeatureModel(clip_folder)
    pics = pictures(2, size=40)
    emb = model.embed_pictures(pics)
    assert emb.shape == (2, model.model.config.projection_dim)
    with torch.no_grad():
        pixels = model.processor(images=pics, return_tensors="pt")["pixel_values"]
        expected = model.model(pixel_values=pixels).image_embeds
    assert torch.allclose(emb, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5)


# -- the paper's protocol -----------------------------------------------------------------------


def test_best_match_lets_an_original_borrow_a_neighbours_recovery(dino_folder):
    model = FeatureModel(dino_folder)
    a, b, c = pictures(3, seed=5)
    # a's own recovery is c (a failure), but b's "recovery" is a itself
    scores, index = best_match_scores([a, b], [c, a], "dino", feature_model=model)
    assert index[0] == 1 and scores[0] == pytest.approx(1.0, abs=1e-5)
    own = float((model.embed_pictures([a]) * model.embed_pictures([c])).sum())
    assert own < scores[0]


def test_best_match_on_a_pixel_metric_uses_the_recovered_region():
    from cgidm_core.masks import checkerboard_mask

    keep = checkerboard_mask((3, 16, 16), 4)
    pics = pictures(3, size=16, seed=2)
    scores, index = best_match_scores(pics, pics[::-1], "mse", keep=keep, size=16)
    assert index == [2, 1, 0] and scores == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)


def test_grid_figures_follow_the_papers_threshold_grids():
    members, holdout = [0.9, 0.8], [0.85, 0.1]
    assert grid_best_accuracy(members, holdout) == 0.75
    assert grid_auc(members, holdout) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    m, h = rng.normal(1, 1, 30), rng.normal(0, 1, 30)
    exact = roc_auc_score([1] * 30 + [0] * 30, np.concatenate([m, h]))
    assert grid_auc(m, h) == pytest.approx(exact, abs=0.01)
    assert grid_best_accuracy([1.0, 2.0], [0.0, 0.5]) == 1.0
    assert grid_auc([1.0], [1.0]) is None
    report = paper_protocol(members, holdout, "clip")
    assert "test scores themselves" in report["accuracy_threshold"] and report["note"] is None


# -- cgidm eval --protocol paper ----------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-eval")
    return write_images(root / "members", 3, seed=1), write_images(root / "holdout", 3, seed=2)


def test_eval_reports_the_papers_protocol_next_to_ours(tiny_ddpm_pair, folders, dino_folder,
                                                        tmp_path, capsys):
    members, holdout = folders
    out = tmp_path / "eval.json"
    code = main([
        "eval", *model_args(tiny_ddpm_pair), "--members", str(members), "--holdout",
        str(holdout), "--steps", "2", "--n-bootstrap", "50", "--repeats", "5", "--metric",
        "dino", "--feature-model", str(dino_folder), "--protocol", "paper", "--json", str(out),
    ])
    assert code == 0
    doc = json.loads(out.read_text())
    comparison = doc["protocol_comparison"]
    theirs, ours = comparison["paper"], comparison["ours"]
    assert doc["protocol"] == "paper"
    assert "best match over all recoveries" in theirs["score"]
    assert "test scores themselves" in theirs["accuracy_threshold"]
    assert theirs["feature_model"]["embedding"].startswith("CLS tokens of the last 4 blocks")
    assert ours["auc"] == doc["auc"] and ours["calibrated_split"]["repeats"] == 5
    for record in doc["images"]:
        # the paper embeds the original file as given (24 px here), ours the pair-size crop
        assert -1.0 <= record["paper_best_match_score"] <= 1.0 + 1e-6
        assert record["paper_best_match"] in {r["name"] for r in doc["images"]
                                              if r["set"] == record["set"]}
    best = {s: [r["paper_best_match_score"] for r in doc["images"] if r["set"] == s]
            for s in ("member", "holdout")}
    assert theirs["accuracy"] == grid_best_accuracy(best["member"], best["holdout"])
    printed = capsys.readouterr().out
    assert "paper's protocol" in printed and "oracle" in printed and "FPR reached" in printed


def test_paper_protocol_on_the_default_pixel_metric_says_so(tiny_ddpm_pair, folders, tmp_path):
    members, holdout = folders
    out = tmp_path / "eval.json"
    code = main([
        "eval", *model_args(tiny_ddpm_pair), "--members", str(members), "--holdout",
        str(holdout), "--steps", "2", "--n-bootstrap", "20", "--repeats", "3", "--protocol",
        "paper", "--json", str(out),
    ])
    assert code == 0
    theirs = json.loads(out.read_text())["protocol_comparison"]["paper"]
    assert theirs["metric"] == "ssim" and "CLIP or DINO" in theirs["note"]


def test_paper_protocol_needs_recoveries(tiny_ddpm_pair, folders, capsys):
    members, holdout = folders
    code = main([
        "eval", *model_args(tiny_ddpm_pair), "--members", str(members), "--holdout",
        str(holdout), "--method", "loss", "--protocol", "paper",
    ])
    assert code != 0
    assert "only the cgidm method" in capsys.readouterr().err
