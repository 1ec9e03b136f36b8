"""The base model's own recovery: the same PGD as the contrast recovery on the base model's loss
alone, shown beside it, and never a change to any score."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from cgidm_core import InversionConfig, authenticate, load_pair
from cgidm_core.base_recovery import base_denoising_loss, recover_with_base
from cgidm_core.images import image_seed, to_pil, to_tensor
from cgidm_core.inversion import contrast_loss, invert

CONFIG = InversionConfig(steps=4, seed=2)


def _pictures(count: int, side: int) -> list:
    gen = torch.Generator().manual_seed(5)
    smooth = torch.nn.functional.interpolate(torch.rand(count, 3, 4, 4, generator=gen) * 2 - 1,
                                             size=(side, side), mode="bilinear")
    return to_pil(smooth)


def test_base_recovery_is_shown_beside_and_changes_no_score(tiny_ddpm_pair):
    pair = load_pair(*tiny_ddpm_pair, device="cpu")
    pictures = _pictures(2, pair.image_size)
    plain = authenticate(pair, pictures, config=CONFIG)
    both = authenticate(pair, pictures, config=replace(CONFIG, base_recovery=True))
    assert both.provenance["method"]["inversion"]["base_recovery"] is True
    for a, b in zip(plain, both, strict=True):
        assert a.base_recovered is None and "base_recovery" not in a.extra
        # the verdict's numbers are the same to the last bit
        assert (a.score, a.metrics, a.extra["attack_scores"]) == \
            (b.score, b.metrics, b.extra["attack_scores"])
        assert np.array_equal(np.asarray(a.recovered), np.asarray(b.recovered))
        # its own picture and its similarity on the same metrics, measured alike
        assert b.base_recovered is not None and b.base_recovered.size == b.recovered.size
        assert set(b.extra["base_recovery"]) == set(b.metrics)
        assert not np.array_equal(np.asarray(b.base_recovered), np.asarray(b.recovered))
        assert b.side_by_side().width > a.side_by_side().width  # a fourth panel


def test_base_recovery_is_the_same_pgd_with_the_base_loss_alone(tiny_ddpm_pair):
    pair = load_pair(*tiny_ddpm_pair, device="cpu")
    tensor = to_tensor(_pictures(2, pair.image_size), pair.image_size)
    seeds = [image_seed(img, 0) for img in tensor]
    cond = pair.conditioning(None)
    config = InversionConfig(steps=6, seed=0)
    contrast = invert(pair, tensor, cond, config, seeds=seeds)
    base = invert(pair, tensor, cond, config, seeds=seeds, objective=base_denoising_loss)
    # the same start, mask and noise draws; only the objective differs
    assert torch.equal(base.partial, contrast.partial) and torch.equal(base.mask, contrast.mask)
    assert torch.equal(base.latent_recovered * base.latent_mask,
                       contrast.latent_original * contrast.latent_mask)
    assert not torch.equal(base.recovered, contrast.recovered)
    assert torch.equal(recover_with_base(pair, tensor, cond, replace(config, base_recovery=True),
                                         seeds=seeds), base.recovered)
    # its loss is the base model's denoising error alone (positive), not the contrast
    t = torch.tensor([10, 500])
    noise = torch.randn((2, *pair.latent_shape), generator=torch.Generator().manual_seed(1))
    z = contrast.latent_original
    own = base_denoising_loss(pair, z, cond, t, noise, None, 1)
    assert own.shape == (2,) and bool((own > 0).all())
    with torch.no_grad():
        both = contrast_loss(pair, z, cond, t, noise, None, 1)
    assert not torch.allclose(own, both)
