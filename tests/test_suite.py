"""The benchmark suite's pieces: splits, checkpointed fine-tunes, candidate scores, ranking, and
the inversion's recording options. Tiny settings, seeded; nothing here times anything."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cgidm_core.errors import ConfigError
from cgidm_core.images import image_seed
from cgidm_core.inversion import InversionConfig, invert
from cgidm_core.models import load_pair_from_paths
from cgidm_core.suite_pairs import find_pair, splits, suite_pairs
from cgidm_core.suite_scores import candidate_scores, colour_distance, rank_candidates
from tests.paths import SHARED_DATA, require_shared_data


@pytest.fixture
def shared_data() -> None:
    """The suite's splits are read from ../shared/data."""
    for name in ("wikiart-vangogh", "dreambooth-subjects"):
        require_shared_data(name)


needs_data = pytest.mark.usefixtures("shared_data")


@needs_data
def test_splits_keep_members_out_of_every_holdout():
    all_splits = splits(SHARED_DATA)
    assert set(all_splits) == {"vangogh-a", "vangogh-b", "dreambooth"}
    for split in all_splits.values():
        members = set(split.members)
        assert len(members) == 10
        for holdout in split.holdouts.values():
            assert len(holdout) == 10
            assert not members & set(holdout)
    a, b = all_splits["vangogh-a"], all_splits["vangogh-b"]
    assert a.members == b.holdouts["holdout"] and b.members == a.holdouts["holdout"]
    db = all_splits["dreambooth"]
    member_subjects = {p.parent.name for p in db.members}
    assert {p.parent.name for p in db.holdouts["hard"]} == member_subjects  # same objects
    assert not {p.parent.name for p in db.holdouts["easy"]} & member_subjects  # other objects


@needs_data
def test_suite_has_three_strengths_two_seeds_and_named_pairs():
    pairs = suite_pairs(SHARED_DATA)
    # 2 Van Gogh splits x 3 strengths x 2 seeds + DreamBooth x 3 x 2 x (hard, easy)
    assert len(pairs) == 12 + 12
    assert len({p.pair_id for p in pairs}) == len(pairs)
    pair = find_pair("dreambooth/medium/s1/easy", SHARED_DATA)
    assert (pair.split.name, pair.strength, pair.seed, pair.holdout) == (
        "dreambooth", "medium", 1, "easy")
    assert find_pair("vangogh-b/strong/s0", SHARED_DATA).holdout == "holdout"
    # every pair carries its recipe group (leave-one-group-out, cgidm_core.held_out)
    assert {p.group for p in pairs} == {"vangogh-a", "vangogh-b", "dreambooth-hard",
                                        "dreambooth-easy"}
    assert pair.recipe_group == "dreambooth-easy" and pair.family == "pixel"
    # strengths of one run share its folder; seeds do not
    light, strong = find_pair("vangogh-a/light/s0"), find_pair("vangogh-a/strong/s0")
    assert light.model_dir(SHARED_DATA).parent == strong.model_dir(SHARED_DATA).parent
    assert find_pair("vangogh-a/light/s1").run_key != light.run_key
    for bad in ("vangogh-a/strong", "vangogh-a/extreme/s0", "nope/light/s0"):
        with pytest.raises(ConfigError):
            find_pair(bad, SHARED_DATA)


@needs_data
def test_checkpoint_of_a_long_run_equals_a_short_run(tmp_path):
    """The light pair is a checkpoint of the strong pair's run: it must be the same weights a
    run of that length alone gives (constant lr, fixed warm-up), or the strengths would not be
    what their names say."""
    from safetensors.torch import load_file

    from cgidm_core.suite_pairs import train_run

    split = splits(SHARED_DATA)["vangogh-a"]
    train_run(split, 0, tmp_path / "long", strengths={"a": 2, "b": 3}, threads=1,
              log=lambda _m: None)
    train_run(split, 0, tmp_path / "short", strengths={"a": 2}, threads=1, log=lambda _m: None)
    weights = "unet/diffusion_pytorch_model.safetensors"
    long_a = load_file(tmp_path / "long" / "a" / weights)
    short_a = load_file(tmp_path / "short" / "a" / weights)
    long_b = load_file(tmp_path / "long" / "b" / weights)
    assert all(torch.equal(long_a[k], short_a[k]) for k in long_a)
    assert any(not torch.equal(long_a[k], long_b[k]) for k in long_a)
    # cached: a second call trains nothing and returns the folders
    done = train_run(split, 0, tmp_path / "long", strengths={"a": 2, "b": 3},
                     log=lambda _m: pytest.fail("retrained a cached checkpoint"))
    assert set(done) == {"a", "b"}


@pytest.fixture(scope="module")
def pair(tiny_ddpm_pair):
    return load_pair_from_paths(*tiny_ddpm_pair, device="cpu")


@pytest.fixture(scope="module")
def images(pair):
    gen = torch.Generator().manual_seed(0)
    size = pair.image_size
    low = torch.rand(2, 3, size // 4, size // 4, generator=gen) * 0.6 - 0.5  # a muted palette
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")


def _invert(pair, images, config, **kw):
    seeds = [image_seed(img, config.seed) for img in images]
    return invert(pair, images, pair.conditioning(None), config, seeds=seeds, **kw)


def test_recorded_steps_and_average_cost_nothing_and_match(pair, images):
    config = InversionConfig(steps=6, seed=1, cell=4)
    plain = _invert(pair, images, config)
    out = _invert(pair, images, config, record_steps=(3, 6), average_from=3)
    assert torch.equal(out.recovered, plain.recovered)  # recording does not change the run
    assert torch.equal(out.recovered_at["step6"], out.recovered)
    short = _invert(pair, images, replace(config, steps=3))
    assert torch.allclose(out.recovered_at["step3"], short.recovered, atol=1e-6)
    assert set(out.recovered_at) == {"step3", "step6", "average"}
    keep = out.mask
    assert torch.allclose(out.recovered_at["average"] * keep, out.recovered * keep)


def test_palette_bounds_keep_each_channel_in_the_kept_range(pair, images):
    config = InversionConfig(steps=8, seed=1, cell=4, alpha=40.0, palette_bounds=True)
    out = _invert(pair, images, config)
    keep = out.mask.bool().expand_as(out.original)
    for i in range(images.shape[0]):
        for c in range(3):
            kept = out.original[i, c][keep[i, c]]
            free = out.recovered[i, c][~keep[i, c]]
            assert free.min() >= kept.min() - 1e-5 and free.max() <= kept.max() + 1e-5
    unbounded = _invert(pair, images, replace(config, palette_bounds=False))
    assert unbounded.recovered.abs().max() > out.recovered.abs().max()


def test_colour_distance_is_zero_for_the_original_and_grows_with_the_change(images):
    keep = torch.zeros(1, 1, *images.shape[-2:])
    keep[..., ::2, :] = 1
    assert colour_distance(images, images, keep) == pytest.approx([0.0, 0.0], abs=1e-6)
    small = colour_distance(images, images + 0.05, keep)
    large = colour_distance(images, (images + 0.5).clamp(-1, 1), keep)
    assert all(0 < s < g for s, g in zip(small, large, strict=True))


def test_candidates_orient_every_score_so_higher_means_member():
    rng = np.random.default_rng(0)
    n = 6
    member = np.r_[np.ones(n), np.zeros(n)]
    values = {
        "default/final/ssim": list(member + rng.normal(0, 0.1, 2 * n)),
        "default/final/psnr": list(member + rng.normal(0, 0.1, 2 * n)),
        "default/objective/second_half": list(-member + rng.normal(0, 0.1, 2 * n)),
        "contrast": list(member + rng.normal(0, 0.1, 2 * n)),
        "loss": list(member + rng.normal(0, 0.1, 2 * n)),
    }
    scores = candidate_scores(values, steps=100)
    for name, (cand, s) in scores.items():
        assert s[:n].min() > s[n:].max(), name
        assert cand.evaluations > 0
    assert scores["default:ssim@final"][0].evaluations > scores["loss"][0].evaluations


def test_ranking_is_worst_case_then_mean_then_cost():
    aucs = {"a": [0.9, 1.0], "b": [0.95, 0.95], "c": [0.9, 1.0], "d": [0.8, 1.0]}
    costs = {"a": 600, "b": 900, "c": 3, "d": 1}
    assert [r[0] for r in rank_candidates(aucs, costs)] == ["b", "c", "a", "d"]


@needs_data
def test_cgidm_eval_runs_one_suite_pair_from_its_cache(tmp_path, capsys):
    """`cgidm eval --suite-pair` finds the pair's models and images; here its cached fine-tune
    is the shipped light demo fine-tune (also demo-base fine-tuned on split A's members), so the
    test trains nothing."""
    import json
    import shutil

    from cgidm.cli import main
    from cgidm_core.demo import demo_model_path

    pair = find_pair("vangogh-a/light/s0", SHARED_DATA)
    model = pair.model_dir(tmp_path)
    shutil.copytree(demo_model_path("demo-vangogh-light"), model)
    (model / "training.json").write_text("{}")
    out = tmp_path / "r.json"
    code = main(["eval", "--suite-pair", "vangogh-a/light/s0", "--suite-cache", str(tmp_path),
                 "--method", "loss", "--n-bootstrap", "100", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert (doc["n_members"], doc["n_holdout"]) == (10, 10)
    assert doc["settings"]["finetuned"] == str(model)
    assert doc["settings"]["members"] == "suite:vangogh-a/light/s0/holdout:members"
    assert 0.0 <= doc["auc"] <= 1.0


def test_cgidm_eval_needs_models_and_folders_or_a_suite_pair(tmp_path, capsys):
    from cgidm.cli import main

    assert main(["eval", "--members", str(tmp_path)]) != 0
    assert "--suite-pair" in capsys.readouterr().err
    assert main(["eval", "--suite-pair", "vangogh-a/light/s0", "--members", str(tmp_path)]) != 0
    assert "names its own models" in capsys.readouterr().err
    assert main(["eval", "--suite-pair", "vangogh-a/nope/s0"]) != 0
    assert "suite pair" in capsys.readouterr().err


def test_palette_bounds_flag_reaches_the_inversion_config():
    import argparse

    from cgidm.commands.common import add_method_arguments, inversion_config

    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    assert inversion_config(parser.parse_args(["--palette-bounds"])).palette_bounds
    assert not inversion_config(parser.parse_args([])).palette_bounds


def test_suite_report_ranks_by_worst_case_and_writes_both_tables(tmp_path):
    """The report renders from a summary alone (what `--report-only` and `--json` give)."""
    from types import SimpleNamespace

    from benchmarks.render_suite import render

    def row(auc, cost):
        return {"auc": auc, "ci": [auc - 0.1, min(1.0, auc + 0.1)], "tpr": 0.5, "fpr": 0.1,
                "target_fpr": 0.1, "cost": cost, "description": ""}

    pairs = [
        {"pair": "vangogh-a/light/s0/holdout", "n_members": 10, "n_holdout": 10,
         "rows": {"loss": row(0.6, 3), "default:psnr@final": row(0.9, 600)},
         "looks": {"default/final/ssim": [0.3, 0.1], "default/final/colour": [20.0, 30.0],
                   "default/final/saturated": [0.2, 0.3]}},
        {"pair": "dreambooth/strong/s1/easy", "n_members": 10, "n_holdout": 10,
         "rows": {"loss": row(1.0, 3), "default:psnr@final": row(0.8, 600)}, "looks": {}},
    ]
    training = {"split": "vangogh-a", "seed": 0, "seconds": 60.0, "load_average": 1.0}
    summary = {"pairs": pairs, "run_seconds": 1.0, "load_average": [1.0, 1.0],
               "command": "python -m benchmarks.suite",
               "models": {"m": {"seconds": {}, "seconds_total": 120.0, "load_average": [1, 2],
                                "training": training, "files": ["a"] * 20,
                                "variants": {"default": {}}}}}
    args = SimpleNamespace(out=tmp_path / "ACCURACY.md", table_out=tmp_path / "table.md")
    text = render(summary, args)
    ranking = text[text.index("## Ranking"):text.index("## Summary")]
    # psnr: worst 0.8, mean 0.85; loss: worst 0.6 -> psnr ranks first despite costing more
    assert ranking.index("default:psnr@final") < ranking.index("`loss`")
    assert "| worst case | | **0.80** | **0.60** |" in text
    assert "0.300 | 0.100 | 20.0 | 30.0 | 20% | 30% |" in text
    assert (tmp_path / "table.md").read_text().startswith("| score |")
    # held out: leaving Van Gogh out, DreamBooth chooses the loss attack (1.0 > 0.8), which
    # scores 0.6 on Van Gogh; leaving DreamBooth out, Van Gogh chooses PSNR (0.8 there)
    held = text[text.index("## Held out"):text.index("## Summary")]
    assert "| vangogh-a | 1 | `loss` | 1.00 / 1.000 | 0.60 | 0.600 |" in held
    assert "| dreambooth-easy | 1 | `default:psnr@final` | 0.90 / 0.900 | 0.80 | 0.800 |" in held
    assert "**0.60 / 0.700**" in held and "`default:psnr@final` chosen and measured" in held



@pytest.mark.slow  # loads a pair and scores 20 images
@needs_data
def test_a_cached_model_gains_a_cheap_score_added_since_without_new_inversions(tmp_path):
    """PIAN joined the suite's cheap scores after hours of cached inversions: the cache key keeps
    version 1's cheap scores and the missing one is computed into the cached values."""
    import json
    import shutil
    from types import SimpleNamespace

    from benchmarks import suite
    from cgidm_core.demo import demo_model_path

    pair = find_pair("vangogh-a/light/s0", SHARED_DATA)
    model = pair.model_dir(tmp_path)
    shutil.copytree(demo_model_path("demo-vangogh-light"), model)
    args = SimpleNamespace(cache=tmp_path)
    out = suite.results_path(args, pair)
    out.parent.mkdir(parents=True)
    n = len(suite.model_images(pair))
    cached = {"values": {**{m: [0.0] * n for m in suite.CHEAP_IN_KEY},
                         "default/final/ssim": [0.5] * n},
              "seconds": {}, "n_members": 10, "holdouts": {"holdout": 10}}
    out.write_text(json.dumps(cached))
    document = suite.model_results(args, pair)
    assert suite.results_path(args, pair) == out  # the key did not move
    assert document["values"]["loss"] == [0.0] * n  # cached values kept as they were
    assert len(document["values"]["pian"]) == n and "pian" in json.loads(out.read_text())["values"]
    assert len(set(document["values"]["pian"])) == n  # scored, one value per image
    assert len(set(document["values"]["contrast64"])) == n  # the shared-draw contrast too


def test_cheap_scores_are_not_added_to_a_document_of_other_images(tmp_path):
    """A cached document scored on other images (or another order) would get values that do not
    line up with its inversions: refused before any model is loaded."""
    import json

    from benchmarks.cheap_values import add_missing_cheap

    out = tmp_path / "values.json"
    out.write_text(json.dumps({"files": ["a/1.png", "a/2.png"], "values": {"loss": [0.0, 0.0]}}))

    def load():
        raise AssertionError("no model is loaded for a refused document")

    with pytest.raises(ValueError, match="other images"):
        add_missing_cheap(out, ["loss", "contrast64"], load, [Path("a/2.png"), Path("a/1.png")])
    # nothing missing: nothing loaded, the document as it was
    assert add_missing_cheap(out, ["loss"], load, [])["values"] == {"loss": [0.0, 0.0]}


def test_strength_section_orders_pairs_by_memorisation_gap_and_holds_out_above_each():
    """The report's strength section: pairs sorted by the members' minus the hold-outs' loss
    drop, and the leave-one-group-out numbers again over the pairs above each gap, so a group of
    fine-tunes that learned nothing of their members (a null in disguise) is seen as such."""
    from benchmarks.render_suite import memorisation_lines
    from cgidm_core.names import VERDICT_CANDIDATE

    def pair(name, gap, shipped, contrast):
        rows = {VERDICT_CANDIDATE: {"auc": shipped, "cost": 728},
                "contrast": {"auc": contrast, "cost": 16}}
        group = name.split("/")[1].rsplit("-r", 1)[0] if "lora" in name else name.split("/")[0]
        return {"pair": name, "rows": rows, "family": "pixel", "group": group,
                "memorisation": {"members_drop": 0.2, "holdout_drop": 0.2 - gap / 100,
                                 "gap": gap / 100}}

    summary = {"pairs": [pair("vangogh-a/light/s0/holdout", 10.6, 0.73, 0.77),
                         pair("vangogh-a/lora-attn-r16/1000/s0/holdout", 0.2, 0.61, 0.51),
                         pair("vangogh-b/light/s0/holdout", 6.0, 0.65, 0.77),
                         pair("vangogh-a/lora-attn-conv-r16/1000/s0/holdout", 5.2, 0.62, 0.64)]}
    text = "\n".join(memorisation_lines(summary))
    order = [text.index(p["pair"]) for p in sorted(summary["pairs"],
                                                   key=lambda p: p["memorisation"]["gap"])]
    assert order == sorted(order)
    # the shipped score first, then the previous verdict and the shared-draw contrast (not
    # measured here), the 8-draw contrast
    assert ("| vangogh-a/lora-attn-r16/1000/s0/holdout | 20.0 % | 19.8 % | 0.2 | 0.61 | - | - "
            "| 0.51 |") in text
    rows = {line.split(" |")[0]: line for line in text.splitlines()
            if line.startswith("| ") and "points |" in line}
    assert "| 0 points | 4 (" in rows["| 0 points"]
    assert rows["| 1 points"].split(" | ")[1].startswith("3 (")  # the attention-only LoRA out
    assert rows["| 10 points"].endswith("| 0.73 / 0.730 |")  # one pair left: shipped only
    assert "- (one group)" in rows["| 10 points"]
    # the latent family's pairs get a table of their own, pixel pairs stay out of it
    latent = [{**pair(f"latent/lora-attn-r{r}/100/s0", gap, 0.6 + gap / 100, 0.5),
               "family": "latent", "group": group}
              for r, gap, group in ((4, 0.4, "lora-attn"), (16, 7.0, "lora-attn-conv"),
                                    (64, 12.0, "style-captioned"))]
    text = "\n".join(memorisation_lines({**summary, "latent_pairs": latent}, "latent"))
    assert "latent/lora-attn-r4/100/s0" in text and "vangogh-a" not in text
    rows = {line.split(" |")[0]: line for line in text.splitlines()
            if line.startswith("| ") and "points |" in line}
    assert rows["| 1 points"].split(" | ")[1].startswith("2 (lora-attn-conv, style-captioned)")
    assert "No latent pair" in "\n".join(memorisation_lines(summary, "latent"))
