"""What makes the reference preset follow the authors' path, and the guards around the PGD:
the sampled VAE latent and the 8-bit partial image, the non-finite-gradient guard, and common
random numbers deciding sharing before tensors move between devices."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cgidm_core.api import authenticate
from cgidm_core.errors import ConfigError
from cgidm_core.images import image_seed, quantize_8bit, to_pil, to_tensor
from cgidm_core.inversion import InversionConfig, invert
from cgidm_core.masks import checkerboard_mask, default_cell
from cgidm_core.models import load_pair_from_paths

CONFIG = InversionConfig(steps=6, seed=3, cell=4)


@pytest.fixture(scope="module")
def ddpm(tiny_ddpm_pair):
    return load_pair_from_paths(*tiny_ddpm_pair, device="cpu")


@pytest.fixture(scope="module")
def sd(tiny_sd_pair):
    return load_pair_from_paths(*tiny_sd_pair, device="cpu", keep_text_encoders=True)


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(2, size // 4), max(2, size // 4), generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")


def run(pair, images, config, prompt=None):
    seeds = [image_seed(img, config.seed) for img in images]
    return invert(pair, images, pair.conditioning(prompt), config, seeds=seeds)


# -- 1. the reference preset ------------------------------------------------------------------


def test_reference_preset_samples_the_latent_and_rounds_the_partial_image():
    ref = InversionConfig.reference()
    assert ref.sample_latent and ref.quantize_partial and ref.reencode_partial
    assert not InversionConfig().sample_latent and not InversionConfig().quantize_partial
    with pytest.raises(ConfigError, match="reencode_partial"):
        InversionConfig(quantize_partial=True).validate()


def test_quantize_8bit_is_the_pil_round_trip():
    x = torch.rand(2, 3, 8, 8) * 2.2 - 1.1  # also outside [-1, 1], as a decoder may give
    q = quantize_8bit(x)
    assert torch.allclose(q, to_tensor(to_pil(x), 8), atol=1e-6)
    assert torch.equal(quantize_8bit(q), q)


def test_sampled_latent_is_diffusers_latent_dist_sample_with_the_images_generator(sd):
    x = smooth_images(2, sd.image_size)
    seeds = [11, 12]
    ours = sd.encode_sampled(x, [torch.Generator().manual_seed(s) for s in seeds])
    with torch.no_grad():
        dist = sd.vae.encode(x).latent_dist
        theirs = dist.sample(generator=[torch.Generator().manual_seed(s) for s in seeds])
    assert torch.allclose(ours, theirs * sd.scaling_factor, atol=1e-6)
    assert not torch.allclose(ours, sd.encode(x), atol=1e-4)  # not the mean


def test_reference_path_starts_from_the_sampled_latent_and_the_8bit_partial(sd):
    images = smooth_images(2, sd.image_size, seed=1)
    config = InversionConfig.reference(steps=2, seed=5)
    out = run(sd, images, config, prompt="sks style")
    seeds = [image_seed(img, config.seed) for img in images]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        z0 = sd.encode_sampled(images, gens)  # first draws of each image's generator
        keep = checkerboard_mask(tuple(z0.shape[1:]), default_cell(tuple(z0.shape[1:]), 2))
        partial = quantize_8bit(sd.decode(z0 * keep))
        z_start = sd.encode_sampled(partial, gens)  # the next draws
    assert torch.allclose(out.latent_original, z0, atol=1e-5)
    assert torch.allclose(out.partial, sd.decode(z_start), atol=1e-5)
    # seeded: the preset repeats exactly
    again = run(sd, images, config, prompt="sks style")
    assert torch.equal(again.recovered, out.recovered)
    # and rounding the partial image does change the start point
    unrounded = run(sd, images, replace(config, quantize_partial=False), prompt="sks style")
    assert not torch.equal(unrounded.partial, out.partial)


def test_sampling_has_no_effect_on_a_pixel_pair(ddpm):
    images = smooth_images(2, ddpm.image_size)
    a = run(ddpm, images, CONFIG)
    b = run(ddpm, images, replace(CONFIG, sample_latent=True))
    assert torch.equal(a.recovered, b.recovered)


# -- 2. non-finite gradients --------------------------------------------------------------------


class PoisonOneImage:
    """Wraps ``eps_finetuned``: at call ``at`` multiply image ``index``'s prediction by NaN.

    Multiplying (rather than assigning) keeps NaN in the backward pass too, as an overflow in a
    float16 UNet does.
    """

    def __init__(self, inner, index: int, at: int):
        self.inner, self.index, self.at, self.calls = inner, index, at, 0

    def __call__(self, z_t, t, cond):
        out = self.inner(z_t, t, cond)
        self.calls += 1
        if self.calls == self.at:
            scale = torch.ones(out.shape[0], 1, 1, 1)
            scale[self.index] = float("nan")
            out = out * scale
        return out


def test_a_nan_gradient_skips_that_images_step_only(ddpm, monkeypatch):
    images = smooth_images(3, ddpm.image_size, seed=2)
    clean = run(ddpm, images, CONFIG)
    assert clean.nonfinite_steps.tolist() == [0, 0, 0]

    monkeypatch.setattr(ddpm, "eps_finetuned", PoisonOneImage(ddpm.eps_finetuned, 1, at=3))
    poisoned = run(ddpm, images, CONFIG)
    assert poisoned.nonfinite_steps.tolist() == [0, 1, 0]
    for i in (0, 2):  # the other images are untouched, bit for bit
        assert torch.equal(poisoned.recovered[i], clean.recovered[i])
        assert torch.equal(poisoned.losses[i], clean.losses[i])
    # the poisoned image recovers, finite, from the step it skipped
    assert torch.isfinite(poisoned.recovered[1]).all()
    assert torch.isfinite(poisoned.latent_recovered[1]).all()
    assert torch.isfinite(poisoned.delta_norm).all()
    assert torch.isnan(poisoned.losses[1, 2]) and torch.isfinite(poisoned.losses[1, 3:]).all()
    assert not torch.equal(poisoned.recovered[1], clean.recovered[1])


def test_the_count_reaches_the_image_result_and_scores_stay_finite(ddpm, monkeypatch):
    pictures = to_pil(smooth_images(3, ddpm.image_size, seed=4))
    # poison the LAST step: the image's final loss is NaN, reported as null, not as NaN
    monkeypatch.setattr(ddpm, "eps_finetuned",
                        PoisonOneImage(ddpm.eps_finetuned, 2, at=CONFIG.steps))
    results = authenticate(ddpm, pictures, config=CONFIG, names=["a", "b", "c"])
    records = {r.name: r.to_dict() for r in results}
    assert [records[n]["nonfinite_gradient_steps"] for n in "abc"] == [0, 0, 1]
    assert records["c"]["final_loss"] is None
    assert all(isinstance(records[n]["final_loss"], float) for n in "ab")
    assert all(torch.isfinite(torch.tensor(r.score)) for r in results)


# -- 3. common random numbers when tensors move between devices ------------------------------


def test_common_noise_builds_one_noisy_latent_even_when_to_copies(ddpm, monkeypatch):
    """``.to(device)`` on a GPU returns a new tensor; here every ``.to`` does, on the CPU."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    inputs: dict[str, torch.Tensor] = {}
    ft, pre = ddpm.eps_finetuned, ddpm.eps_pretrained

    def eps_ft(z_t, t, cond):
        inputs["ft"] = z_t
        return ft(z_t, t, cond)

    def eps_pre(z_t, t, cond):
        seen.append((inputs.pop("ft"), z_t))
        return pre(z_t, t, cond)

    real_to = torch.Tensor.to

    def copying_to(self, *args, **kwargs):
        return real_to(self, *args, **kwargs).clone()

    monkeypatch.setattr(ddpm, "eps_finetuned", eps_ft)
    monkeypatch.setattr(ddpm, "eps_pretrained", eps_pre)
    monkeypatch.setattr(torch.Tensor, "to", copying_to)
    assert torch.zeros(1).to("cpu") is not torch.zeros(1)  # the patch is in force
    images = smooth_images(2, ddpm.image_size)

    run(ddpm, images, CONFIG)
    assert len(seen) == CONFIG.steps
    assert all(a is b for a, b in seen), "common noise: both models must get one noisy latent"

    seen.clear()
    run(ddpm, images, replace(CONFIG, common_random_numbers=False))
    assert len(seen) == CONFIG.steps
    assert all(a is not b and not torch.equal(a, b) for a, b in seen)


def test_the_service_result_carries_the_count(ddpm, monkeypatch):
    """The worker builds each image's entry as ``ImageScore(**result.to_dict(), ...)``."""
    from cgidm.jobs import ImageScore, artifact_links

    monkeypatch.setattr(ddpm, "eps_finetuned", PoisonOneImage(ddpm.eps_finetuned, 0, at=2))
    (result,) = authenticate(ddpm, to_pil(smooth_images(1, ddpm.image_size)), config=CONFIG,
                             names=["x"])
    entry = ImageScore(**result.to_dict(), role="image", artifacts=artifact_links("job", "x"))
    document = entry.model_dump(mode="json")
    assert document["nonfinite_gradient_steps"] == 1
    assert isinstance(document["final_loss"], float)
    assert "nonfinite_gradient_steps" in ImageScore.model_json_schema()["properties"]
