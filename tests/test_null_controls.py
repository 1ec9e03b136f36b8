"""Null controls: with a fine-tune equal to its base, the paired verdict score must not tell one
image from another (cgidm_core.evidence "paired", cgidm_core.null_values, the suite's rule)."""

import copy

import numpy as np
import pytest

from cgidm_core.evidence import build_evidence, evidence_scores
from cgidm_core.held_out import fixed_score
from tests.paths import SHARED_DATA

VANGOGH = SHARED_DATA / "wikiart-vangogh"


@pytest.fixture(scope="module")
def base_against_itself_records(tiny_ddpm_pair):
    """Records of `authenticate` on a pair whose fine-tune IS its base (4 members' paintings,
    4 hold-out ones), as a 0-step LoRA is."""
    from cgidm_core.api import authenticate, load_pair
    from cgidm_core.inversion import InversionConfig

    pre, ft = tiny_ddpm_pair
    pair = load_pair(pre, ft)
    pair.unet_finetuned = copy.deepcopy(pair.unet_pretrained)  # load_pair refuses equal models
    paths = [*sorted((VANGOGH / "membership").glob("*.jpg"))[:4],
             *sorted((VANGOGH / "hold_out").glob("*.jpg"))[:4]]
    results = authenticate(pair, paths, config=InversionConfig(steps=3), batch_size=8)
    return [r.to_dict() for r in results]


def test_paired_score_is_the_same_for_every_image_when_the_finetune_is_the_base(
        base_against_itself_records):
    records = base_against_itself_records
    # zero contrast along the whole inversion and at the original, for every image
    for record in records:
        assert record["inversion_scores"]["objective_second_half"] == 0.0
        assert record["attack_scores"]["contrast"] == 0.0
        # the verdict's parts: the shared-draw contrast, and a recovery that never moved
        assert record["attack_scores"]["contrast64"] == 0.0
        assert record["inversion_scores"]["progress"] == 0.0
        assert record["inversion_scores"]["cosine"] == 0.0
    paired = evidence_scores(records, "paired")
    assert paired == [0.0] * len(records)
    # the old verdict's score still ranks the images: what the images are, not a fine-tune
    fused = evidence_scores(records, "fused")
    assert np.std(fused) > 0.5
    doc = build_evidence(records[:4], records[4:], alpha=0.05)
    assert doc["evidence"]["score"] == "paired" and "fallback_from" not in doc["evidence"]
    assert {r["p_value"] for r in doc["images"]} == {1.0}  # every control ties every image


def test_paired_falls_back_to_the_contrast_when_a_record_lacks_the_inversion_scores(
        base_against_itself_records):
    """A record of an older cgidm (no inversion_scores), or an objective that overflowed: the
    paired score and the previous one both need them; the contrast alone does not."""
    records = [dict(r) for r in base_against_itself_records]
    records[0] = {k: v for k, v in records[0].items() if k != "inversion_scores"}
    doc = build_evidence(records[:4], records[4:])
    assert doc["evidence"]["score"] == "contrast"
    assert doc["evidence"]["fallback_from"] == "paired"
    assert "progress" in doc["evidence"]["fallback_reason"]
    assert doc["evidence"]["components"] == ["attack:contrast"]


def test_suite_gain_over_the_start_is_exactly_null_on_a_null_pair():
    """A recovery that never left its start (decoded in another batch: 1e-6 apart) gives a
    gain of 0 for every image, not z-scored float noise; the unpaired similarity still
    separates the images."""
    from cgidm_core.suite_scores import candidate_scores

    rng = np.random.default_rng(0)
    start = np.concatenate([rng.uniform(0.5, 0.6, 5), rng.uniform(0.3, 0.4, 5)])
    values = {"default/final/ssim": list(start + rng.normal(0, 1e-6, 10)),
              "default/final/psnr": list(start * 30), "contrast": [0.0] * 10}
    null = {"start/ssim": list(start), "start/psnr": list(start * 30)}
    scores = candidate_scores(values, 100, null)
    assert list(scores["gain-start:ssim"][1]) == [0.0] * 10
    assert list(scores["fuse:gain-start+contrast"][1]) == [0.0] * 10
    biased = scores["default:ssim@final"][1]
    assert min(biased[:5]) > max(biased[5:])  # AUC 1 with no fine-tune


def test_start_relative_candidates_score_every_image_alike_when_the_recovery_is_its_start():
    """Every start-relative candidate (ratios, earlier steps, fusions with the paired score's
    parts) is one value for all images of a null pair (recovery = start up to decoder noise,
    objective and contrast 0), while on images whose recoveries moved they do separate."""
    from cgidm_core.suite_scores import (
        START_RELATIVE_FUSIONS,
        candidate_scores,
        start_relative_values,
    )

    rng = np.random.default_rng(1)
    ssim = np.concatenate([rng.uniform(0.5, 0.6, 5), rng.uniform(0.3, 0.4, 5)])
    psnr = ssim * 30
    null = {"start/ssim": list(ssim), "start/psnr": list(psnr)}

    def recovered(shift: np.ndarray) -> dict[str, list[float]]:
        values = {"contrast": list(shift * 0.1),
                  "default/objective/second_half": list(-shift * 0.1)}
        for recovery in ("final", "step25", "step50", "average"):
            values[f"default/{recovery}/ssim"] = list(ssim + shift + rng.normal(0, 1e-6, 10))
            values[f"default/{recovery}/psnr"] = list(psnr + 30 * shift
                                                      + rng.normal(0, 1e-6, 10))
        return values

    names = [*start_relative_values({k: np.asarray(v) for k, v in recovered(
        np.zeros(10)).items()}, {k: np.asarray(v) for k, v in null.items()}),
             *START_RELATIVE_FUSIONS]
    assert {"gain-start:ssim-logratio", "gain-start:ssim-fraction",
            "gain-start:psnr@step25"} <= set(names)
    at_start = candidate_scores(recovered(np.zeros(10)), 100, null)
    for name in names:
        assert len(set(at_start[name][1].tolist())) == 1, name  # AUC exactly 0.5
    # members (first 5) moved towards their originals, hold-outs did not
    moved = candidate_scores(recovered(np.r_[np.full(5, 0.05), np.zeros(5)]), 100, null)
    for name in names:
        scores = moved[name][1]
        assert min(scores[:5]) > max(scores[5:]), name


def test_displacement_of_a_recovery_that_never_left_its_start_is_zero_for_every_image():
    """cosine / progress of the PGD's displacement: exactly 0 for every image when the recovery
    is its start (up to decoder noise), whatever the image; 1 for a recovery that arrived at the
    original, negative for one moved away; the fused candidates then score every image of a
    null pair alike."""
    import torch

    from cgidm_core.suite_scores import candidate_scores, displacement_values

    gen = torch.Generator().manual_seed(0)
    original = torch.rand(6, 3, 8, 8, generator=gen) * 2 - 1
    keep = (torch.arange(8)[:, None] // 2 + torch.arange(8)[None, :] // 2) % 2 == 0
    keep = keep.float()[None, None]
    start = original * keep
    noise = torch.randn(start.shape, generator=gen) * 1e-6
    null = displacement_values(original, start + noise, start, keep)
    assert null == {"cosine": [0.0] * 6, "progress": [0.0] * 6}
    arrived = displacement_values(original, original, start, keep)
    assert arrived["cosine"] == [1.0] * 6 and arrived["progress"] == [1.0] * 6
    away = displacement_values(original, start - 0.5 * (original - start), start, keep)
    assert away["cosine"] == [-1.0] * 6 and away["progress"] == [-0.5] * 6
    values = {"default/final/cosine": null["cosine"], "default/final/progress": null["progress"],
              "contrast": [0.0] * 6, "default/objective/second_half": [0.0] * 6}
    scores = candidate_scores(values, 100)
    for name in ("default:cosine@final", "default:progress@final",
                 "fuse:objective+contrast+progress", "fuse:objective+contrast+cosine"):
        assert len(set(scores[name][1].tolist())) == 1, name


def test_eligibility_rule_of_the_null_controls():
    from benchmarks.null_controls import eligibility

    def row(auc, lo, hi):
        return {"auc": auc, "ci": [lo, hi]}

    results = [
        {"pair": "null/a", "rows": {"paired": row(0.5, 0.5, 0.5), "ssim": row(0.84, 0.61, 0.99),
                                    "loss": row(0.58, 0.31, 0.82), "wide": row(0.7, 0.45, 0.9)}},
        {"pair": "null/b", "rows": {"paired": row(0.5, 0.5, 0.5), "loss": row(0.30, 0.1, 0.55)}},
    ]
    verdict = eligibility(results)
    assert verdict["paired"] == ""
    assert "0.84" in verdict["ssim"] and "null/a" in verdict["ssim"]  # interval excludes 0.5
    assert "null/b" in verdict["loss"]  # outside [0.35, 0.65] on the second null pair
    assert verdict["wide"] != ""  # interval reaches 0.5 but the estimate is outside the band


def test_fixed_score_worst_and_mean_with_intervals():
    scores = {"p1": ([3.0, 4.0], [1.0, 2.0]), "p2": ([1.0, 4.0], [2.0, 3.0])}
    row = fixed_score(scores, n_bootstrap=50)
    assert (row["worst"], row["mean"], row["pairs"]) == (0.5, 0.75, 2)
    assert row["worst_ci"][0] <= row["worst_ci"][1] and row["mean_ci"][0] <= 0.75


def test_null_values_use_the_seeds_of_the_checks_own_inversions(tiny_ddpm_pair, tmp_path):
    """The cached null values (cgidm_core.null_values) are the base recovery `authenticate`
    makes for the same image: same per-image seeds and noise draws, so a difference between a
    pair's value and the null value is not noise of other draws. Cached per image: a second
    call computes nothing."""
    from dataclasses import replace

    from cgidm_core.api import authenticate, load_pair
    from cgidm_core.inversion import InversionConfig
    from cgidm_core.null_values import cached_null_values, compute_null_values

    pre, ft = tiny_ddpm_pair
    pair = load_pair(pre, ft)
    files = sorted((VANGOGH / "membership").glob("*.jpg"))[:2]
    config = InversionConfig(steps=3)
    results = authenticate(pair, files, config=replace(config, base_recovery=True),
                           attack_scores=())
    null = compute_null_values(pair, files, tmp_path / "null", config)
    assert null["base/ssim"] == pytest.approx(
        [r.extra["base_recovery"]["ssim"] for r in results], abs=1e-6)
    assert null["base/psnr"] == pytest.approx(
        [r.extra["base_recovery"]["psnr"] for r in results], abs=1e-5)
    assert cached_null_values(tmp_path / "null", files) == null
    other = compute_null_values(pair, files, tmp_path / "other", replace(config, seed=1))
    assert other["base/ssim"] != null["base/ssim"]  # the seeds matter: the check is not vacuous


def test_weight_noise_is_relative_to_each_tensor_and_reproducible():
    """The weight-noise null's perturbation: seeded (the same seed, the same model), another seed
    another direction, and of NOISE_SCALE x each tensor's own spread, so a wide layer and a
    narrow one are disturbed alike."""
    import torch

    from benchmarks.null_controls import NOISE_SCALE, add_weight_noise

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with torch.no_grad():
        base[1].weight.mul_(100.0)  # a layer 100x wider than the other
    copies = [copy.deepcopy(base) for _ in range(3)]
    for model, seed in zip(copies, (0, 0, 1), strict=True):
        add_weight_noise(model, NOISE_SCALE, seed)
    same = [torch.equal(a, b) for a, b in zip(copies[0].parameters(), copies[1].parameters(),
                                              strict=True)]
    assert all(same)
    assert not torch.equal(copies[0][0].weight, copies[2][0].weight)
    for layer in (0, 1):
        delta = copies[0][layer].weight - base[layer].weight
        ratio = float(delta.std() / base[layer].weight.std())
        assert ratio == pytest.approx(NOISE_SCALE, rel=0.1), layer


def test_pooled_ranks_keep_what_the_images_do_and_drop_each_seeds_direction():
    from benchmarks.null_controls import noise_p_value, pooled_ranks

    rng = np.random.default_rng(0)
    image_bias = np.r_[np.ones(10), np.zeros(10)]  # members score higher under any weights
    biased = [list(image_bias + rng.normal(0, 0.6, 20)) for _ in range(4)]
    unbiased = [list(rng.normal(0, 1, 20)) for _ in range(4)]
    pooled_biased, pooled_unbiased = pooled_ranks(biased), pooled_ranks(unbiased)
    assert len(pooled_biased) == 20
    # the bias survives the pooling; one seed alone shows it less clearly
    p_pooled = noise_p_value(pooled_biased[:10], pooled_biased[10:])
    p_single = [noise_p_value(s[:10], s[10:]) for s in biased]
    assert p_pooled < 0.01 and p_pooled <= min(p_single)
    assert noise_p_value(pooled_unbiased[:10], pooled_unbiased[10:]) > 0.05
    # seeds that point opposite ways cancel
    assert noise_p_value(*np.split(np.array(pooled_ranks(
        [list(image_bias), list(-image_bias)])), 2)) == 1.0
    assert noise_p_value([0.0] * 10, [0.0] * 10) == 1.0


def test_eligibility_rule_of_the_weight_noise_nulls():
    """Pooled weight-noise nulls decide by the p-value at NOISE_ALPHA / (their number), not by the
    band (an unbiased score's AUC at 10 + 10 leaves the band often); per-seed results are shown,
    never used."""
    from benchmarks.null_controls import eligibility

    def row(auc, p=None):
        out = {"auc": auc, "ci": [max(0.0, auc - 0.25), min(1.0, auc + 0.25)]}
        return out if p is None else {**out, "p": p}

    exact = {"pair": "null/a", "rule": "exact", "rows": {"paired": row(0.5), "image": row(0.5),
                                                          "edge": row(0.5)}}
    pooled = [{"pair": f"noise/pixel/{i}/pooled", "rule": "noise",
               "rows": {"paired": row(0.70, 0.12), "image": row(0.95, 0.0004),
                        "edge": row(0.76, 0.02)}} for i in range(4)]
    seed = {"pair": "noise/pixel/0/s0", "rule": "seed", "rows": {"paired": row(0.99, 1e-5)}}
    verdict = eligibility([exact, *pooled, seed])
    assert verdict["paired"] == ""  # AUC 0.70 outside the band, but p = 0.12: no evidence of bias
    assert "p = 0.0004" in verdict["image"] and "weight noise" in verdict["image"]
    assert verdict["edge"] == ""  # 0.02 >= 0.05 / 4: four pooled nulls, Bonferroni
    assert "0.02" in eligibility([exact, pooled[0]])["edge"]  # 0.02 < 0.05 / 1


def test_noise_null_results_pool_the_cached_seeds_per_split(monkeypatch, tmp_path):
    """`noise_null_results` reads each seed's cached document, scores every split per seed and
    pooled; a contrast that follows the images (members higher under every seed) is flagged by
    the pooled p-value, one that changes sign from seed to seed is not."""
    from benchmarks import null_controls as nc

    files = [f"{p.parent.name}/{p.name}" for p in nc.null_files("pixel")]
    members = {f for _name, split, n in nc._null_splits("pixel") for f in split[:n]}
    rng = np.random.default_rng(0)

    def document(seed):
        sign = 1.0 if seed % 2 == 0 else -1.0
        follows = [float(f in members) + rng.normal(0, 0.5) for f in files]
        flips = [sign * float(f in members) + rng.normal(0, 0.5) for f in files]
        return {"seed": seed, "files": files, "inversion": {"steps": 100},
                "values": {"contrast": follows, "loss": flips}}

    docs = {seed: document(seed) for seed in nc.NOISE_SEEDS}
    monkeypatch.setattr(nc, "noise_null_document",
                        lambda cache, family, seed, **kw: docs.get(seed))
    monkeypatch.setattr(nc, "null_lookup", lambda cache, family, steps=100: {})
    results = nc.noise_null_results(tmp_path, "pixel", n_bootstrap=50)
    pooled = [r for r in results if r["rule"] == "noise"]
    assert [r["pair"] for r in pooled] == [f"noise/pixel/{n}/pooled" for n, _f, _m in
                                           nc._null_splits("pixel")]
    assert len([r for r in results if r["rule"] == "seed"]) == 3 * len(nc.NOISE_SEEDS)
    for result in pooled:
        assert result["rows"]["contrast"]["p"] < 0.001 and result["rows"]["contrast"]["auc"] > 0.9
        assert result["rows"]["loss"]["p"] > 0.05
    verdict = nc.eligibility(pooled)
    assert verdict["contrast"] != "" and verdict["loss"] == ""
    # fewer than two seeds cached: nothing to pool
    monkeypatch.setattr(nc, "noise_null_document",
                        lambda cache, family, seed, **kw: docs[0] if seed == 0 else None)
    assert nc.noise_null_results(tmp_path, "pixel", n_bootstrap=50) == []


def test_latent_base_against_itself_is_an_exact_null_and_its_noise_copy_is_not():
    """The latent null pair is the shipped LoRA pair with every B matrix zeroed (the continuum's
    0-step LoRA). A LoRA pair is ONE UNet whose adapter is switched per model, so a copy of it
    must be made before adding weight noise: a first version copied the adapter along and
    scored base vs base + the trained LoRA as its 'null' (contrast AUC 0.92)."""
    import torch

    from benchmarks import null_controls as nc
    from cgidm_core.images import load_image
    from cgidm_core.inversion import InversionConfig
    from cgidm_core.suite_scores import raw_values

    torch.manual_seed(0)
    files = nc.null_files("latent")[:2]
    pictures = [load_image(p) for p in files]
    config = InversionConfig(steps=3)
    pair = nc.base_against_itself("latent")
    exact = raw_values(pair, pictures, config=config, variants={"default": {}},
                       cheap=("contrast",))["values"]
    assert exact["contrast"] == [0.0, 0.0]
    assert exact["default/objective/second_half"] == [0.0, 0.0]
    pair.unet_finetuned = copy.deepcopy(pair.unet_pretrained)
    nc.add_weight_noise(pair.unet_finetuned, nc.NOISE_SCALE, 0)
    noisy = raw_values(pair, pictures, config=config, variants={"default": {}},
                       cheap=("contrast",))["values"]
    assert all(v != 0.0 for v in noisy["contrast"])
