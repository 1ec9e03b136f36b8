"""Pixel LoRAs (cgidm_core.pixel_lora) and the one-command suite report over both families
(benchmarks.suite), on the shipped demo base and a tiny synthetic cache."""

from __future__ import annotations

import json

import pytest
import torch

from cgidm_core.demo import resolve_model_reference
from cgidm_core.errors import ModelFormatError
from cgidm_core.pixel_lora import (
    DIFFUSERS_FILE,
    PixelLoraRecipe,
    add_lora,
    merge_lora_file,
    save_lora,
)
from cgidm_core.training import load_pipeline_parts
from cgidm_testkit.tinymodels import randomize_lora_b
from tests.paths import SHARED_DATA, require_shared_data


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    """A rank-4 attention + convolution LoRA of demo-base with alpha = rank / 2 (so a loader
    that ignored alpha would double it), its B matrices set to seeded random values (peft starts
    them at 0, which would make every merge trivially equal), saved in both formats."""
    base = resolve_model_reference("demo-base")
    unet, _ = load_pipeline_parts(base)
    recipe = PixelLoraRecipe(rank=4, targets="attn_conv", lora_alpha=2.0)
    add_lora(unet, recipe)
    randomize_lora_b(unet, torch.Generator().manual_seed(0), scale=0.05)
    folder = tmp_path_factory.mktemp("lora")
    diffusers_file, kohya_file = save_lora(unet, recipe, folder)
    return base, unet.eval(), diffusers_file, kohya_file


def test_diffusers_and_kohya_files_merge_to_the_same_weights_as_the_live_adapter(trained_lora):
    base, live, diffusers_file, kohya_file = trained_lora
    assert diffusers_file.name == DIFFUSERS_FILE
    from_diffusers, _ = merge_lora_file(diffusers_file, base)
    from_kohya, _ = merge_lora_file(kohya_file, base)
    a, b = from_diffusers.state_dict(), from_kohya.state_dict()
    assert a.keys() == b.keys() and not any("lora" in k for k in a)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    original, _ = load_pipeline_parts(base)
    changed = [k for k in a if not torch.equal(a[k], original.state_dict()[k])]
    assert any("conv1" in k for k in changed) and any("to_q" in k for k in changed)
    # merged weights compute what the unmerged adapter computes (alpha / rank honoured)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        expected = live(x, t).sample
        assert torch.allclose(from_diffusers(x, t).sample, expected, atol=1e-4)
        assert torch.allclose(from_kohya(x, t).sample, expected, atol=1e-4)
        assert not torch.allclose(original(x, t).sample, expected, atol=1e-3)


def test_a_kohya_layer_that_fits_no_module_is_refused(tmp_path, trained_lora):
    from safetensors.torch import save_file

    base = trained_lora[0]
    bad = tmp_path / "other.safetensors"
    save_file({"lora_unet_nowhere_conv.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_nowhere_conv.lora_up.weight": torch.zeros(8, 4)}, str(bad))
    with pytest.raises(ModelFormatError, match="fits no layer"):
        merge_lora_file(bad, base)
    save_file({"model.weight": torch.zeros(2)}, str(bad))
    with pytest.raises(ModelFormatError, match="neither a diffusers"):
        merge_lora_file(bad, base)


# ------------------------------------------------------------------ the one-command report


def _values(n_members: int, n_holdout: int, separation: float, keys: list[str]) -> dict:
    """Raw values where members score higher by ``separation`` (and a deterministic spread)."""
    gen = torch.Generator().manual_seed(len(keys) + int(100 * separation))
    out = {}
    for key in keys:
        noise = torch.randn(n_members + n_holdout, generator=gen).tolist()
        sign = -1.0 if key in ("loss", "pia", "pian", "secmi") else 1.0  # lower = member
        out[key] = [sign * (separation if i < n_members else 0.0) + v
                    for i, v in enumerate(noise)]
    return out


PIXEL_KEYS = ["loss", "pia", "secmi", "contrast", "pian", "default/final/ssim",
              "default/final/psnr"]


def _write_pixel_result(suite, args, pair, separation: float) -> None:
    model = pair.model_dir(args.cache)
    model.mkdir(parents=True)
    (model / "training.json").write_text(json.dumps({"steps": 1, "seconds": 1.0}))
    n1, n0 = len(pair.split.members), len(pair.holdout_files)
    document = {"model": str(model), "files": [], "n_members": n1, "holdouts": {"holdout": n0},
                "values": _values(n1, n0, separation, PIXEL_KEYS), "seconds": {},
                "seconds_total": 1.0, "load_average": [0.0, 0.0],
                "training": {"split": "vangogh-a", "seed": pair.seed, "seconds": 1.0,
                             "load_average": 0.0}}
    out = suite.results_path(args, pair)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document))


def test_report_holds_out_both_families_lists_missing_pairs_and_keeps_hand_written_text(
        tmp_path):
    require_shared_data("wikiart-vangogh")
    from benchmarks import latent_suite, suite
    from benchmarks.render_suite import BEGIN_MARK, END_MARK
    from cgidm_core import latent_suite_pairs as lsp

    report = tmp_path / "ACCURACY.md"
    report.write_text(f"# kept intro\n\n{BEGIN_MARK}\nold generated\n{END_MARK}\n\n"
                      "## Hand-written section\nkept text\n")
    args = suite.parse_args([
        "--cache", str(tmp_path / "cache"), "--data", str(SHARED_DATA), "--report-only",
        "--datasets", "vangogh-a", "--strengths", "light", "--seeds", "0",
        "--lora", "lora-attn-r16:0", "lora-attn-conv-r16:0", "--n-bootstrap", "20",
        "--out", str(report), "--table-out", "", "--grid", ""])
    pairs = suite.selected_pairs(args)
    assert [p.pair_id for p in pairs] == [
        "vangogh-a/light/s0/holdout", "vangogh-a/lora-attn-r16/1000/s0/holdout",
        "vangogh-a/lora-attn-conv-r16/1000/s0/holdout"]
    # every LoRA checkpoint is evaluated as "<run>/<steps>/merged": the runs name the results
    assert len({suite.results_path(args, p) for p in pairs}) == len(pairs)
    _write_pixel_result(suite, args, pairs[0], 2.0)
    _write_pixel_result(suite, args, pairs[1], 1.0)  # the attn-conv LoRA is not cached
    for recipe, separation in (("lora-attn-r16", 1.5), ("dreambooth", 0.5)):
        pair = lsp.latent_suite_pairs(SHARED_DATA, recipes=(recipe,), steps=(1000,),
                                      seeds=(0,))[0]
        out = latent_suite.results_file(pair, args.cache, 100)
        out.parent.mkdir(parents=True)
        out.write_text(json.dumps({
            "n_members": 10, "holdouts": {"holdout": 10}, "inversion": {"steps": 100},
            "values": _values(10, 10, separation, ["loss", "contrast", "default/final/ssim",
                                                   "default/final/psnr"])}))

    assert suite.run_suite(args, pairs) == 0
    text = report.read_text()
    assert text.startswith("# kept intro\n") and text.endswith("## Hand-written section\n"
                                                               "kept text\n")
    assert "old generated" not in text and text.count(BEGIN_MARK) == 1
    head = text[text.index("## Headline"):text.index("## The pairs")]
    pixel_row = next(line for line in head.splitlines() if line.startswith("| pixel |"))
    latent_row = next(line for line in head.splitlines() if line.startswith("| latent |"))
    assert "2 (lora-attn, vangogh-a)" in pixel_row and "[" in pixel_row  # with intervals
    assert "2 (dreambooth, lora-attn)" in latent_row and "[" in latent_row
    assert "`vangogh-a/lora-attn-conv-r16/1000/s0/holdout (not trained)`" in head
    assert "`latent/style-captioned/1000/s1`" in head  # latent pairs not cached are named
    assert "**1 pairs missing**" in head


def test_a_report_file_without_markers_is_not_overwritten(tmp_path):
    from benchmarks.render_suite import HandWrittenReportError, write_generated

    hand = tmp_path / "ACCURACY.md"
    hand.write_text("written by hand\n")
    with pytest.raises(HandWrittenReportError, match="markers"):
        write_generated(hand, "generated")
    assert hand.read_text() == "written by hand\n"
    fresh = tmp_path / "new.md"
    write_generated(fresh, "generated")
    write_generated(fresh, "again")
    assert "again" in fresh.read_text() and "generated\n" not in fresh.read_text()
