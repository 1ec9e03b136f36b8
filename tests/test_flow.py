"""CGI-DM for flow matching on pixel models: forward process, contrast, baselines, the demo pair.

Tiny random flow pairs (a tiny UNet2DModel saved with a FlowMatchEulerDiscreteScheduler) for the
mechanics; the shipped demo-flow pair for loading by name, ``cgidm check`` and its membership
signal.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cgidm.cli import main
from cgidm_core import baselines, training
from cgidm_core.api import authenticate
from cgidm_core.api import load_pair as load_named_pair
from cgidm_core.demo import DEMO_BASES, DEMO_FAMILIES, demo_model_path
from cgidm_core.errors import ConfigError, IncompatiblePairError, ModelFormatError
from cgidm_core.images import image_seed
from cgidm_core.inversion import InversionConfig, contrast_loss
from cgidm_core.models import load_pair_from_paths
from cgidm_core.models.flow import shifted_sigmas
from cgidm_core.models.pixel_flow import PixelFlowPair
from cgidm_testkit import tinymodels
from tests.paths import SHARED_DATA, require_shared_data

VANGOGH = SHARED_DATA / "wikiart-vangogh"
CPU = {"device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    return tinymodels.make_tiny_pixel_flow_pair(tmp_path_factory.mktemp("flow"))


@pytest.fixture(scope="module")
def pair(flow_dirs) -> PixelFlowPair:
    return load_pair_from_paths(*flow_dirs, **CPU)


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 4, size // 4, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")


# -- the forward process -------------------------------------------------------------------------


def test_a_flow_scheduler_makes_a_pixel_folder_a_flow_pair(pair):
    assert isinstance(pair, PixelFlowPair)
    assert pair.family == "pixel-flow" and pair.prediction_type == "flow"
    assert pair.alphas_cumprod is None and pair.num_train_timesteps == 1000
    assert not pair.conditional and pair.latent_bounds == (-1.0, 1.0)
    assert pair.describe()["prediction"] == "velocity"
    assert pair.finetuned_kind == "ddpm"


def test_forward_process_interpolates_and_the_target_is_the_velocity(pair):
    x0, noise = _images(3), torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 250, 999])
    s = torch.tensor([0.0, 0.25, 0.999]).view(-1, 1, 1, 1)
    assert torch.allclose(pair.add_noise(x0, noise, t), (1 - s) * x0 + s * noise)
    assert torch.equal(pair.loss_target(x0, noise, t), noise - x0)
    # Following the velocity from x_s for s steps lands on the clean image.
    x_s = pair.add_noise(x0, noise, t)
    assert torch.allclose(x_s - s * pair.loss_target(x0, noise, t), x0, atol=1e-6)


def test_time_shift_moves_draws_to_high_noise_and_keeps_the_ends():
    t = torch.tensor([0, 250, 500, 1000])
    assert torch.allclose(shifted_sigmas(t, 1000, 1.0), torch.tensor([0.0, 0.25, 0.5, 1.0]))
    shifted = shifted_sigmas(t, 1000, 3.0)
    assert shifted[0] == 0 and shifted[-1] == pytest.approx(1.0)
    assert shifted[2] == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)
    assert (shifted[1:3] > torch.tensor([0.25, 0.5])).all()


def test_training_and_inversion_use_the_same_forward_process(pair):
    """The demo flow models are trained by ``training.noised_and_target``; the inversion uses
    ``pair.add_noise``/``loss_target``: they must agree, timestep given to the UNet included."""
    scheduler = training.build_flow_scheduler()
    x0, noise = _images(4), torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 100, 500, 999])
    noised, target, model_t = training.noised_and_target(scheduler, x0, noise, t)
    assert torch.allclose(noised, pair.add_noise(x0, noise, t))
    assert torch.equal(target, pair.loss_target(x0, noise, t))
    assert torch.allclose(model_t, pair.sigmas(t) * 1000)
    with torch.no_grad():
        direct = pair.unet_finetuned(noised, model_t).sample
    assert torch.allclose(pair.eps_finetuned(noised, t, pair.conditioning(None)), direct)


def test_the_unet_is_told_the_shifted_noise_level(flow_dirs):
    pair = load_pair_from_paths(*flow_dirs, **CPU)
    pair.flow_shift = 3.0
    z, t = _images(1), torch.tensor([500])
    with torch.no_grad():
        told = pair.unet_pretrained(z, torch.tensor([750.0])).sample
    assert torch.allclose(pair.eps_pretrained(z, t, pair.conditioning(None)), told)


# -- the contrast and the baselines --------------------------------------------------------------


def test_contrast_loss_is_the_velocity_contrast(pair):
    z = _images(2)
    gen = torch.Generator().manual_seed(5)
    samples = 3
    t = torch.randint(1, 1000, (2 * samples,), generator=gen)
    noise = torch.randn((2 * samples, 3, 16, 16), generator=gen)
    cond = pair.conditioning(None)
    with torch.no_grad():
        got = contrast_loss(pair, z, cond, t, noise, None, samples)
        z_rep = z.repeat_interleave(samples, 0)
        s = (t.float() / 1000).view(-1, 1, 1, 1)
        x_s, v = (1 - s) * z_rep + s * noise, noise - z_rep
        ft = pair.unet_finetuned(x_s, t.float()).sample
        pre = pair.unet_pretrained(x_s, t.float()).sample
        want = ((ft - v).pow(2).flatten(1).mean(1) - (pre - v).pow(2).flatten(1).mean(1))
    assert torch.allclose(got, want.view(2, samples).mean(1), atol=1e-6)


def test_loss_attack_scores_the_velocity_error(pair):
    z = _images(2)
    seeds = [11, 12]
    scores = baselines.loss_attack(pair, z, pair.conditioning(None), seeds=seeds)
    for i, seed in enumerate(seeds):
        noise = torch.randn((3, 3, 16, 16), generator=torch.Generator().manual_seed(seed))
        errs = []
        for k, t in enumerate((50, 100, 200)):
            s = t / 1000
            x_s = (1 - s) * z[i] + s * noise[k]
            with torch.no_grad():
                v = pair.unet_finetuned(x_s[None], torch.tensor([float(t)])).sample[0]
            errs.append((v - (noise[k] - z[i])).pow(2).mean())
        assert scores[i].item() == pytest.approx(-float(torch.stack(errs).mean()), abs=1e-6)


def test_contrast_baseline_runs_and_vanishes_for_identical_models(pair):
    z = _images(3)
    scores = baselines.contrast(pair, z, pair.conditioning(None), seed=0)
    assert scores.shape == (3,) and torch.isfinite(scores).all() and scores.abs().sum() > 0
    same = PixelFlowPair(pair.unet_pretrained, pair.unet_pretrained,
                         device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(baselines.contrast(same, z, same.conditioning(None)), torch.zeros(3))


@pytest.mark.parametrize("method", ["pia", "secmi"])
def test_ddim_based_baselines_refuse_a_flow_pair(pair, method):
    with pytest.raises(ConfigError, match="flow-matching") as err:
        baselines.BASELINES[method](pair, _images(1), pair.conditioning(None))
    assert "loss attack" in str(err.value)


# -- the method: batches and seeds ---------------------------------------------------------------


def test_batch_independence_and_same_seed_reproducibility(pair):
    config = InversionConfig(steps=6, seed=2)
    pictures = [img for img in _images(3, seed=4)]
    from PIL import Image

    pictures = [Image.fromarray(((p.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
                for p in pictures]
    together = authenticate(pair, pictures, config=config, batch_size=3)
    alone = [authenticate(pair, [p], config=config, batch_size=1)[0] for p in pictures]
    again = authenticate(pair, pictures, config=config, batch_size=3)
    other_seed = authenticate(pair, pictures, config=InversionConfig(steps=6, seed=3),
                              batch_size=3)
    for a, b, c in zip(together, alone, again, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert a.score == c.score
    assert len({round(r.score, 6) for r in together}) == 3
    assert [r.score for r in other_seed] != [r.score for r in together]
    assert image_seed(_images(1)[0], 0) == image_seed(_images(1)[0], 0)


# -- refusals ------------------------------------------------------------------------------------


def test_flow_base_with_a_ddpm_finetune_is_refused(flow_dirs, tiny_ddpm_pair):
    with pytest.raises(IncompatiblePairError, match="flow-matching model.*DDPM") as err:
        load_pair_from_paths(flow_dirs[0], tiny_ddpm_pair[1], **CPU)
    assert "give the base the fine-tune was trained from" in str(err.value)
    with pytest.raises(IncompatiblePairError, match="is a DDPM.*flow-matching"):
        load_pair_from_paths(tiny_ddpm_pair[0], flow_dirs[1], **CPU)


def test_flow_base_with_a_stable_diffusion_finetune_is_refused(flow_dirs, tiny_sd_pair):
    with pytest.raises(IncompatiblePairError, match="pixel-space flow-matching model"):
        load_pair_from_paths(flow_dirs[0], tiny_sd_pair[1], **CPU)


def test_identical_flow_models_and_dynamic_shifting_are_refused(flow_dirs, tmp_path):
    with pytest.raises(IncompatiblePairError, match="exactly the weights"):
        load_pair_from_paths(flow_dirs[0], flow_dirs[0], **CPU)
    dynamic = tmp_path / "dynamic"
    shutil.copytree(flow_dirs[0], dynamic)
    config_file = dynamic / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["use_dynamic_shifting"] = True
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="dynamic"):
        load_pair_from_paths(dynamic, flow_dirs[1], **CPU)


def test_training_a_tiny_flow_model_lowers_its_velocity_loss(tmp_path):
    unet = tinymodels.tiny_ddpm_unet(seed=0, sample_size=16)
    scheduler = training.build_flow_scheduler()
    images = _images(4, seed=9)
    before = training.denoising_losses(unet, scheduler, images, samples=8, seed=1)
    config = training.TrainConfig(steps=40, batch_size=4, learning_rate=3e-3, seed=0)
    training.train(unet, scheduler, training.FixedImages(images, seed=0), config, progress=False)
    after = training.denoising_losses(unet, scheduler, images, samples=8, seed=1)
    assert after.mean() < before.mean()
    out = training.save_pipeline(unet, scheduler, tmp_path / "model")
    reloaded, reloaded_scheduler = training.load_pipeline_parts(out)
    assert training.is_flow_scheduler(reloaded_scheduler)


# -- the shipped demo flow pair ------------------------------------------------------------------


def test_demo_flow_models_are_listed_and_load_by_name():
    assert DEMO_BASES["demo-flow-vangogh"] == "demo-flow-base"
    assert DEMO_FAMILIES["demo-flow-base"] == DEMO_FAMILIES["demo-flow-vangogh"] == "pixel-flow"
    pair = load_named_pair("demo-flow-base", "demo-flow-vangogh", **CPU)
    assert isinstance(pair, PixelFlowPair) and pair.image_size == 32
    facts = json.loads((demo_model_path("demo-flow-vangogh") / "training.json").read_text())
    assert facts["objective"] == "flow_matching" and facts["base"] == "demo-flow-base"
    base_facts = json.loads((demo_model_path("demo-flow-base") / "training.json").read_text())
    assert base_facts["init_from"] == "demo-base"
    # The recorded membership signal: members lost more velocity loss than hold-outs.
    assert facts["member_diff_mean"] < facts["holdout_diff_mean"]
    assert facts["loss_diff_auc"] >= 0.9


def test_demo_flow_pair_and_ddpm_demo_models_do_not_mix():
    with pytest.raises(IncompatiblePairError, match="flow-matching"):
        load_named_pair("demo-flow-base", "demo-vangogh", **CPU)
    with pytest.raises(IncompatiblePairError, match="flow-matching"):
        load_named_pair("demo-base", "demo-flow-vangogh", **CPU)


def test_cgidm_check_runs_on_the_demo_flow_pair(tmp_path, capsys):
    require_shared_data("wikiart-vangogh", "membership")
    members = sorted((VANGOGH / "membership").glob("*.jpg"))[:2]
    out = tmp_path / "out"
    code = main(["check", "--pretrained", "demo-flow-base", "--finetuned", "demo-flow-vangogh",
                 "--steps", "5", "--seed", "0", "--out", str(out), *map(str, members)])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    assert doc["settings"]["pair"]["family"] == "pixel-flow"
    assert doc["settings"]["pair"]["prediction"] == "velocity"
    assert [r["name"] for r in doc["images"]] == [m.name for m in members]
    for record in doc["images"]:
        assert isinstance(record["score"], float)
        assert (out / record["recovered"]).is_file() and (out / record["side_by_side"]).is_file()


def test_cgidm_eval_refuses_a_ddim_baseline_on_the_flow_pair_in_one_line(capsys):
    require_shared_data("wikiart-vangogh", "membership")
    code = main(["eval", "--pretrained", "demo-flow-base", "--finetuned", "demo-flow-vangogh",
                 "--members", str(VANGOGH / "membership"), "--holdout",
                 str(VANGOGH / "hold_out"), "--method", "secmi"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "SecMI" in err and "loss attack" in err
