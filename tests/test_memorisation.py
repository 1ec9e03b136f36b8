"""cgidm_core.memorisation: members' minus hold-outs' loss drop, the suite's strength axis."""

from __future__ import annotations

import copy

import pytest

from tests.paths import SHARED_DATA

VANGOGH = SHARED_DATA / "wikiart-vangogh"


@pytest.fixture(scope="module")
def images():
    members = sorted((VANGOGH / "membership").glob("*.jpg"))[:3]
    holdouts = sorted((VANGOGH / "hold_out").glob("*.jpg"))[:3]
    return members, holdouts


def test_loss_drops_are_exactly_zero_without_a_finetune_and_cached(tiny_ddpm_pair, images,
                                                                    tmp_path, monkeypatch):
    """Common random numbers: the base against itself drops by exactly 0 for every image (no
    Monte Carlo noise left in a difference); a fine-tune does not; a second call reads the
    cache instead of evaluating the models again."""
    from cgidm_core import memorisation

    pre, ft = tiny_ddpm_pair
    members, holdouts = images
    same = memorisation.loss_drops(pre, pre, members, holdouts)
    assert (same["members_drop"], same["holdout_drop"], same["gap"]) == (0.0, 0.0, 0.0)
    first = memorisation.cached_loss_drops(tmp_path, pre, ft, members, holdouts)
    assert first["members_drop"] != 0.0 and first["gap"] == pytest.approx(
        first["members_drop"] - first["holdout_drop"])
    monkeypatch.setattr(memorisation, "loss_drops", lambda *a: pytest.fail("recomputed"))
    assert memorisation.cached_loss_drops(tmp_path, pre, ft, members, holdouts) == first


def test_pair_loss_drops_work_through_the_pair_api(tiny_ddpm_pair, images):
    """The family-agnostic measure (what a latent or flow pair gets): zero on a pair whose
    fine-tune is a copy of its base, and the same sign of change as the folder measure."""
    from cgidm_core.api import load_pair
    from cgidm_core.memorisation import pair_loss_drops

    pre, ft = tiny_ddpm_pair
    members, holdouts = images
    pair = load_pair(pre, ft)
    real = pair_loss_drops(pair, members, holdouts, samples=16)
    assert real["members_drop"] != 0.0
    pair.unet_finetuned = copy.deepcopy(pair.unet_pretrained)
    null = pair_loss_drops(pair, members, holdouts, samples=16)
    assert (null["members_drop"], null["holdout_drop"], null["gap"]) == (0.0, 0.0, 0.0)
