"""Baseline membership scores on tiny real pairs (pixel DDPM and Stable Diffusion layout)."""

from contextlib import contextmanager

import pytest
import torch

from cgidm_core.baselines import (
    BASELINES,
    EVALUATIONS_PER_IMAGE,
    SHARED_CONTRAST_SAMPLES,
    contrast,
    contrast_shared,
    loss_attack,
    pia,
    scale_timestep,
    secmi,
    shared_contrast_pass,
)
from cgidm_core.errors import ConfigError
from cgidm_core.images import image_seed
from cgidm_core.models import DDPMPair, load_pair_from_paths

NAMES = sorted(BASELINES)


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random pictures in [-1, 1], like downscaled photos."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(2, size // 4), max(2, size // 4), generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")


@pytest.fixture(scope="module")
def ddpm(tiny_ddpm_pair):
    pair = load_pair_from_paths(*tiny_ddpm_pair, device="cpu")
    images = smooth_images(3, pair.image_size, seed=0)
    return pair, pair.encode(images), pair.conditioning(None), images


@pytest.fixture(scope="module")
def sd(tiny_sd_pair):
    pair = load_pair_from_paths(*tiny_sd_pair, device="cpu")
    images = smooth_images(3, pair.image_size, seed=1)
    with torch.no_grad():
        z0 = pair.encode(images)
    return pair, z0, pair.conditioning("sks style"), images


@pytest.fixture(params=["ddpm", "sd"])
def setup(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtype_and_finite(setup, name):
    pair, z0, cond, _ = setup
    scores = BASELINES[name](pair, z0, cond, seed=0)
    assert scores.shape == (3,)
    assert scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.isfinite(scores).all()
    assert not torch.equal(scores, torch.zeros(3))  # two different models: a real signal


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_scores(setup, name):
    pair, z0, cond, _ = setup
    a = BASELINES[name](pair, z0, cond, seed=5)
    b = BASELINES[name](pair, z0, cond, seed=5)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["loss", "contrast", "contrast64"])
def test_seed_changes_the_noise(ddpm, name):
    pair, z0, cond, _ = ddpm
    a = BASELINES[name](pair, z0, cond, seed=5)
    b = BASELINES[name](pair, z0, cond, seed=6)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_an_image_scores_the_same_alone_and_in_a_batch(setup, name):
    pair, z0, cond, images = setup
    seeds = [image_seed(img, 3) for img in images]
    together = BASELINES[name](pair, z0, cond, seed=3, seeds=seeds)
    alone = torch.cat([
        BASELINES[name](pair, z0[i : i + 1], cond, seed=3, seeds=seeds[i : i + 1])
        for i in range(3)
    ])
    reordered = BASELINES[name](pair, z0.flip(0), cond, seed=3, seeds=seeds[::-1]).flip(0)
    chunked = BASELINES[name](pair, z0, cond, seed=3, seeds=seeds, batch_size=2)
    # float32 batched kernels differ in the last bits; contrast is a difference of two errors of
    # size ~1, so its float noise is absolute (~1e-7), not relative to its small value.
    atol = 1e-6 if name.startswith("contrast") else 1e-12
    for other in (alone, reordered, chunked):
        torch.testing.assert_close(other, together, rtol=1e-4, atol=atol)


def test_contrast_is_exactly_zero_for_the_same_model(ddpm):
    loaded = ddpm[0]
    # load_pair_from_paths refuses identical weights (nothing to contrast), so build the pair
    # directly.
    pair = DDPMPair(
        loaded.unet_pretrained, loaded.unet_pretrained, loaded.alphas_cumprod,
        device=torch.device("cpu"), dtype=torch.float32,
    )
    z0 = pair.encode(smooth_images(3, pair.image_size, seed=2))
    for score in (contrast, contrast_shared):
        assert torch.equal(score(pair, z0, pair.conditioning(None), seed=0), torch.zeros(3))


def test_the_shared_draw_contrast_scores_every_image_on_the_same_draws(ddpm):
    """Per-image seeds are ignored: the score is the contrast with ``seed`` for every image, so
    two images differ by what the models do with them, not by their draws."""
    pair, z0, cond, _ = ddpm
    shared = contrast_shared(pair, z0, cond, seed=4, seeds=[1, 2, 3])
    assert torch.equal(shared, contrast_shared(pair, z0, cond, seed=4))
    expected = contrast(pair, z0, cond, seeds=[4] * len(z0), samples=SHARED_CONTRAST_SAMPLES)
    torch.testing.assert_close(shared, expected, rtol=1e-4, atol=1e-6)


def test_the_shared_draw_contrast_never_puts_more_latents_in_a_pass_than_the_contrast(ddpm):
    """64 draws of one image would be 8x the 8-draw contrast's batch on a real UNet: the
    evaluations are chunked to ``batch_size * 8`` noisy latents per pass, values unchanged."""
    pair, z0, cond, _ = ddpm
    seen = []
    forward = pair.eps_finetuned

    def counting(z_t, t, c):
        seen.append(z_t.shape[0])
        return forward(z_t, t, c)

    pair.eps_finetuned = counting
    try:
        small = contrast_shared(pair, z0, cond, seed=2, batch_size=1,
                                latents_per_pass=shared_contrast_pass(1, 64, "cuda"))
    finally:
        del pair.eps_finetuned  # the bound method again
    assert max(seen) == 8 and sum(seen) == len(z0) * SHARED_CONTRAST_SAMPLES
    torch.testing.assert_close(small, contrast_shared(pair, z0, cond, seed=2, batch_size=8),
                               rtol=1e-4, atol=1e-6)
    # on the CPU a pass's fixed cost, not memory, is the bound: one image's draws at once
    assert shared_contrast_pass(1, 64, "cpu") == 64 and shared_contrast_pass(20, 64, "cpu") == 160


def test_schedule_scaling_of_timesteps():
    assert scale_timestep(200, 1000) == 200
    assert scale_timestep(200, 100) == 20
    assert scale_timestep(999, 50) == 49
    assert EVALUATIONS_PER_IMAGE == {"loss": 3, "pia": 2, "pian": 2, "secmi": 11, "contrast": 16,
                                     "contrast64": 128}


def test_bad_inputs_are_config_errors(ddpm):
    pair, z0, cond, _ = ddpm
    with pytest.raises(ConfigError, match="latent shape"):
        loss_attack(pair, z0[:, :2], cond)  # wrong channel count
    with pytest.raises(ConfigError, match="latent shape"):
        loss_attack(pair, z0[:, :, :7, :7], cond)  # a side the UNet cannot halve
    with pytest.raises(ConfigError, match="one seed per image"):
        loss_attack(pair, z0, cond, seeds=[1])
    with pytest.raises(ConfigError, match="t_sec"):
        secmi(pair, z0, cond, t_sec=10, interval=10)
    with pytest.raises(ConfigError, match="p must"):
        pia(pair, z0, cond, p=0)
    with pytest.raises(ConfigError, match="samples"):
        contrast(pair, z0, cond, samples=0)


# ------------------------------------------------------------ a model that memorised one image


@contextmanager
def one_thread():
    """Training a tiny net is 10x slower when two threads fight other processes for 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny DDPM base and a fine-tune of it trained on image 0 only (300 steps, ~15 s)."""
    from diffusers import DDPMScheduler

    from cgidm_core.training import FixedImages, TrainConfig, save_pipeline, train
    from cgidm_testkit.tinymodels import make_tiny_ddpm, tiny_ddpm_unet

    root = tmp_path_factory.mktemp("memorised")
    base = make_tiny_ddpm(root / "base", seed=0)
    images = smooth_images(6, 16, seed=7)
    unet = tiny_ddpm_unet(seed=0)  # the base's own weights
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    config = TrainConfig(steps=300, batch_size=8, learning_rate=2e-3, warmup_steps=10, seed=0)
    with one_thread():
        train(unet, scheduler, FixedImages(images[:1], seed=0), config, progress=False)
    finetuned = save_pipeline(unet, scheduler, root / "finetuned")
    return load_pair_from_paths(base, finetuned, device="cpu"), images


@pytest.mark.slow  # trains a tiny net to memorise an image: ~20 s
def test_loss_attack_ranks_the_training_image_first(memorised):
    pair, images = memorised
    scores = loss_attack(pair, pair.encode(images), pair.conditioning(None), seed=0)
    assert int(scores.argmax()) == 0
    assert scores[0] > scores[1:].max() + 0.1  # by a wide margin, not by luck


@pytest.mark.slow  # shares the memorised net above
def test_contrast_ranks_the_training_image_first(memorised):
    pair, images = memorised
    scores = contrast(pair, pair.encode(images), pair.conditioning(None), seed=0)
    assert int(scores.argmax()) == 0
