"""The PGD itself, on a tiny random pixel-space pair (fast, deterministic)."""

import math
from dataclasses import replace

import pytest
import torch

from cgidm_core.errors import Cancelled, ConfigError
from cgidm_core.images import image_seed
from cgidm_core.inversion import (
    REFERENCE_FREE_ENTRIES,
    InversionConfig,
    contrast_loss,
    invert,
    scaled_radius,
)
from cgidm_core.models import load_pair_from_paths

CONFIG = InversionConfig(steps=12, seed=3, cell=4)


@pytest.fixture(scope="module")
def pair(tiny_ddpm_pair):
    return load_pair_from_paths(*tiny_ddpm_pair, device="cpu")


@pytest.fixture(scope="module")
def images(pair):
    gen = torch.Generator().manual_seed(0)
    size = pair.image_size
    # smooth random images, like downscaled pictures
    low = torch.rand(3, 3, size // 4, size // 4, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")


def run(pair, images, config=CONFIG, **kw):
    seeds = [image_seed(img, config.seed) for img in images]
    cond = pair.conditioning(None)
    return invert(pair, images, cond, config, seeds=seeds, **kw)


def test_reference_settings_are_the_authors():
    ref = InversionConfig.reference()
    assert (ref.steps, ref.alpha, ref.epsilon, ref.t_min) == (1000, 2.0, 70.0, 1)
    assert ref.mc_samples == 1 and not ref.common_random_numbers and ref.reencode_partial
    assert ref.sample_latent and ref.quantize_partial and not ref.bounded
    assert ref.resolved_t_max(1000) == 999
    assert scaled_radius(ref, REFERENCE_FREE_ENTRIES) == (2.0, 70.0)
    alpha, eps = scaled_radius(ref, 4 * REFERENCE_FREE_ENTRIES)
    assert (alpha, eps) == (4.0, 140.0)


def test_kept_cells_equal_the_original(pair, images):
    out = run(pair, images)
    keep = out.latent_mask
    assert torch.equal(out.latent_recovered * keep, out.latent_original * keep)
    # pixel model: the kept pixels of the recovered picture are the original's
    assert torch.allclose(out.recovered * out.mask, out.original.clamp(-1, 1) * out.mask)
    # and the free half did move
    assert not torch.allclose(out.recovered * (1 - out.mask), out.original * (1 - out.mask))


def test_pgd_stays_inside_the_epsilon_ball(pair, images):
    tight = replace(CONFIG, epsilon=5.0)
    out = run(pair, images, tight)
    free_entries = int((1 - out.latent_mask).sum().item()) * images.shape[1]
    _, eps = scaled_radius(tight, free_entries)
    assert eps == pytest.approx(out.epsilon)
    assert (out.delta_norm <= eps * (1 + 1e-5)).all()
    assert (out.delta_norm >= eps * 0.99).all()  # 12 steps of 2.0*scale reach a radius of 5*scale


def test_pgd_lowers_the_contrast_loss(pair, images):
    config = replace(CONFIG, steps=40, alpha=6.0, epsilon=200.0)
    out = run(pair, images, config)
    gen = torch.Generator().manual_seed(123)
    samples = 64
    n = images.shape[0]
    t = torch.randint(1, 1000, (n * samples,), generator=gen)
    noise = torch.randn((n * samples, *images.shape[1:]), generator=gen)
    cond = pair.conditioning(None)
    start = out.latent_original * out.latent_mask  # the partial start point
    with torch.no_grad():
        before = contrast_loss(pair, start, cond, t, noise, noise, samples)
        after = contrast_loss(pair, out.latent_recovered, cond, t, noise, noise, samples)
    assert (after < before).all(), (before, after)


def test_same_seed_same_result_and_other_seed_differs(pair, images):
    a, b = run(pair, images), run(pair, images)
    assert torch.equal(a.recovered, b.recovered)
    c = run(pair, images, replace(CONFIG, seed=4))
    assert not torch.allclose(a.recovered, c.recovered)


def test_an_image_gives_the_same_result_alone_and_in_a_batch(pair, images):
    batch = run(pair, images)
    for i in range(images.shape[0]):
        alone = run(pair, images[i : i + 1])
        assert torch.allclose(alone.recovered[0], batch.recovered[i], atol=1e-4)
        assert torch.allclose(alone.losses[0], batch.losses[i], atol=1e-4)
    reordered = run(pair, images.flip(0))
    assert torch.allclose(reordered.recovered.flip(0), batch.recovered, atol=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        {"common_random_numbers": False},
        {"mc_samples": 3},
        {"reencode_partial": True},
        {"t_min": 100, "t_max": 300},
    ],
)
def test_variants_run_and_stay_finite(pair, images, options):
    out = run(pair, images[:1], replace(CONFIG, steps=3, **options))
    assert torch.isfinite(out.recovered).all() and torch.isfinite(out.losses).all()


def test_progress_reports_every_step(pair, images):
    seen = []
    run(pair, images[:1], progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, CONFIG.steps) for i in range(1, CONFIG.steps + 1)]


def test_cancel_hook_stops_within_a_few_steps(pair, images):
    steps_done = []
    with pytest.raises(Cancelled):
        run(
            pair,
            images[:1],
            replace(CONFIG, steps=1000),
            progress=lambda done, total: steps_done.append(done),
            should_cancel=lambda: len(steps_done) >= 7,
        )
    assert len(steps_done) <= 10


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"alpha": -1.0},
        {"epsilon": math.nan},
        {"mc_samples": 0},
        {"t_min": 500, "t_max": 100},
        {"t_max": 5000},
        {"cell": 3},
        {"quantize_partial": True},
    ],
)
def test_invalid_settings_are_refused(pair, images, bad):
    with pytest.raises(ConfigError):
        run(pair, images[:1], replace(CONFIG, **bad))
