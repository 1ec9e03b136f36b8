"""The latent suite's recipes and its strength continuum: the recipes carry the usual trainers'
defaults, DreamBooth with prior preservation trains on the class term too, the continuum's
0-step checkpoint is the base itself, continuum runs never share a cache folder with the
suite's runs, and the continuum's limits are read off the points as documented.

All on a tiny random pipeline or synthetic rows: a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import latent_continuum as lc
from cgidm_core import latent_finetune as lf
from cgidm_core import latent_suite_pairs as lsp
from cgidm_core import latent_training as lt


@pytest.fixture(scope="module")
def random_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("latent")
    tokenizer = lt.load_tokenizer(lt.write_clip_tokenizer(root / "tok",
                                                          lt.caption_corpus(0, scenes=50)))
    torch.manual_seed(0)
    return lt.save_sd_pipeline(root / "base", unet=lt.build_unet(), vae=lt.build_vae(),
                               text_encoder=lt.build_text_encoder(tokenizer),
                               tokenizer=tokenizer, scheduler=lt.build_scheduler())


def _members(folder: Path, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        files.append(folder / f"wheat-field-{i}-1888.png")
        Image.new("RGB", (40, 40), (60 * i, 120, 200 - 50 * i)).save(files[-1])
    return files


def test_recipes_carry_the_usual_trainers_defaults():
    recipes = {name: recipe for name, (_group, recipe) in lsp.RECIPES.items()}
    for rank in (4, 16, 64):
        for targets in ("attn", "attn_conv"):
            r = recipes[f"lora-{targets.replace('_', '-')}-r{rank}"]
            assert (r.kind, r.rank, r.targets, r.learning_rate) == ("lora", rank, targets, 1e-4)
    prior = recipes["dreambooth-prior"]
    assert prior.prior_preservation and prior.prior_loss_weight == 1.0
    assert (prior.kind, prior.learning_rate, prior.save_as) == ("full", 5e-6, "pipeline")
    assert not recipes["dreambooth"].prior_preservation
    style = recipes["style-captioned"]
    assert (style.captions, style.learning_rate) == ("per_image", 1e-5)
    assert lf.caption_of(Path("wheat-field-with-cypresses-1889.jpg")) == (
        "a painting of wheat field with cypresses in sks style")
    assert {group for group, _ in lsp.RECIPES.values()} >= {"dreambooth-prior",
                                                            "style-captioned"}


def test_continuum_runs_are_their_own_cache_folders(tmp_path):
    _members(tmp_path / "wikiart-vangogh" / "membership")
    _members(tmp_path / "wikiart-vangogh" / "hold_out")
    continuum = lsp.continuum_pairs(tmp_path)
    assert [p.steps for p in continuum] == list(lsp.CONTINUUM_CHECKPOINTS)
    assert continuum[0].steps == 0 and all(p.continuum for p in continuum)
    assert continuum[0].recipe.steps == max(lsp.CONTINUUM_CHECKPOINTS)
    assert continuum[0].pair_id == "latent-continuum/lora-attn-r16/0/s0"
    suite = lsp.latent_suite_pairs(tmp_path, recipes=("lora-attn-r16",), steps=(100,),
                                   seeds=(0,))[0]
    assert not suite.continuum and suite.recipe.steps == max(lsp.CHECKPOINTS)
    assert suite.run_dir(tmp_path) != continuum[0].run_dir(tmp_path)
    assert len({p.run_dir(tmp_path) for p in continuum}) == 1
    with pytest.raises(Exception, match="choose from"):
        lsp.continuum_pairs(tmp_path, steps=(7,))


def test_untrained_checkpoint_is_the_base_and_prior_preservation_adds_the_class_term(
        random_base, tmp_path):
    members = _members(tmp_path / "m")
    plain = lf.LatentRecipe("lora", 2, 1e-3, batch_size=2, rank=4)
    prior = lf.LatentRecipe("lora", 2, 1e-3, batch_size=2, rank=4, prior_preservation=True,
                            class_images=2)
    runs = {}
    for name, recipe in (("plain", plain), ("prior", prior)):
        runs[name] = lf.finetune(random_base, members, recipe, 0,
                                 {0: tmp_path / name / "0", 2: tmp_path / name / "2"},
                                 log=lambda _m: None, loss_samples=8)
    # 0 steps: the adapter's B matrices are zero, the members' loss is the base's, exactly.
    assert runs["plain"][0]["members_loss_drop"] == 0.0
    assert runs["plain"][0]["final_train_loss"] is None
    assert json.loads((tmp_path / "plain" / "0" / "training.json").read_text())["steps"] == 0
    # The prior run trained on the class images the base drew from the class prompt: its
    # training loss is the instance term plus a class term of the same size.
    assert runs["prior"][2]["class_prompt"] == lt.CLASS_PROMPT
    assert runs["prior"][2]["class_images"] == 2 and runs["plain"][2]["class_images"] == 0
    assert runs["prior"][2]["final_train_loss"] > 1.5 * runs["plain"][2]["final_train_loss"]


def _row(pair: str, drop: float, auc: float, low: float) -> dict:
    return {"pair": pair, "group": "lora-attn", "steps": 0, "members_loss_drop": drop / 7,
            "members_loss_drop_relative": drop,
            "auc": {m: [auc, low, min(1.0, auc + 0.2)] for m in lc.ls.COLUMNS}}


def test_strength_limits_are_read_off_the_sorted_points(tmp_path):
    rows = [_row("latent-continuum/x/0/s0", 0.0, 0.5, 0.25),
            _row("latent-continuum/x/25/s0", 0.02, 0.7, 0.45),
            _row("latent-continuum/x/100/s0", 0.04, 0.86, 0.62),
            _row("latent/y/100/s0", 0.05, 0.80, 0.55),  # a miss above a hit: holds from above
            _row("latent-continuum/x/300/s0", 0.08, 0.9, 0.7),
            _row("latent-continuum/x/1000/s0", 0.11, 0.97, 0.9)]
    assert lc.strength_limits(rows, "evidence") == (0.08, 0.02)
    assert lc.strength_limits(rows[:1], "evidence") == (None, 0.0)
    assert lc.strength_limits(rows[2:], "loss") == (0.08, None)
    table = lc.limits_table(rows)
    assert "| evidence | 8.0 % | 2.0 % | 0.50 [0.25, 0.70] |" in table
    assert lc.continuum_table(rows[::-1]).index("/0/s0") < lc.continuum_table(rows).index(
        "/1000/s0")
    out = lc.plot(rows, tmp_path / "c.png")
    assert out.stat().st_size > 1000 and Image.open(out).size[0] > 400
