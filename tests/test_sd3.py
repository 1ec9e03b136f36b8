"""Stable Diffusion 3.5 (medium and large layouts): every layout predicts the velocity diffusers'
own StableDiffusion3Pipeline computes.

References come from ``StableDiffusion3Pipeline`` itself (``encode_prompt`` for CLIP-L + CLIP-G
+ T5, the transformer called with the scheduler's timesteps ``1000 s`` shifted by its config,
``load_lora_weights`` for LoRAs), on tiny random models of the real classes
(``cgidm_testkit.tiny_families``), CPU, float32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file

from cgidm.cli import main
from cgidm_core.errors import IncompatiblePairError, ModelFormatError, UnsupportedModelFamilyError
from cgidm_core.models import detect_finetuned_kind, load_pair_from_paths
from cgidm_core.models.formats import pipeline_family
from cgidm_core.models.sd3 import SD3LoraPair, SD3Pair
from cgidm_core.names import SD3_FAMILY
from cgidm_testkit import tiny_families
from tests.paths import SHARED_DATA

PROMPT = "sks style"
CPU = {"device": "cpu"}


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd35-medium")
    base = tiny_families.make_tiny_sd3(root / "base", layout="3.5-medium")
    return {
        "base": base,
        "pipeline": tiny_families.make_sd3_full_finetune(base, root / "full", seed=2),
        "transformer": tiny_families.make_sd3_transformer_folder(base, root / "db", seed=3),
        "single_file": tiny_families.make_sd3_single_file(base, root / "ft.safetensors", seed=4),
        "lora": tiny_families.make_sd3_lora(base, root / "lora", seed=5, with_clip=True,
                                            card_prompt="a painting in sks style"),
    }


def _reference_pipeline(models: dict[str, Path], kind: str) -> StableDiffusion3Pipeline:
    no_t5 = not (models["base"] / "text_encoder_3").is_dir()
    pipe = StableDiffusion3Pipeline.from_pretrained(
        models["base"], local_files_only=True,
        **({"text_encoder_3": None, "tokenizer_3": None} if no_t5 else {}))
    if kind == "lora":
        pipe.load_lora_weights(str(models[kind]))
    elif kind != "base":
        folder = models[kind]
        if kind == "single_file":
            folder = folder.parent / f"{folder.stem}_diffusers"
        pipe.transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer")
    return pipe


def _reference_velocity(pipe: StableDiffusion3Pipeline, z, t, prompt=PROMPT):
    """The transformer's output at ``sigma = shift s / (1 + (shift - 1) s)``, ``s = t / 1000``,
    called as the pipeline's denoising loop calls it (``timestep = 1000 sigma``)."""
    shift = pipe.scheduler.config.shift
    s = t.float() / 1000
    sigma = shift * s / (1 + (shift - 1) * s)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, prompt_3=None,
                                                  device="cpu", do_classifier_free_guidance=False)
        return pipe.transformer(hidden_states=z, timestep=sigma * 1000,
                                encoder_hidden_states=embeds.expand(z.shape[0], -1, -1),
                                pooled_projections=pooled.expand(z.shape[0], -1)).sample


def _inputs(shape, batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=generator), torch.tensor([20, 700][:batch])


def _velocities(pair, z, t, prompt=PROMPT):
    cond = pair.conditioning(prompt)
    with torch.no_grad():
        return pair.eps_finetuned(z, t, cond), pair.eps_pretrained(z, t, cond)


def test_detects_sd3_and_every_layout(medium, tmp_path):
    assert pipeline_family(medium["base"]) == SD3_FAMILY
    expected = {"pipeline": "pipeline", "transformer": "dreambooth",
                "single_file": "single_file", "lora": "lora"}
    assert {k: detect_finetuned_kind(medium[k]) for k in expected} == expected
    bare = tmp_path / "bare"
    shutil.copytree(medium["transformer"] / "transformer", bare)
    assert detect_finetuned_kind(bare) == "dreambooth"


#: The quick suite runs the LoRA layout (one transformer, adapter on/off, CLIP LoRA layers); the
#: other layouts run with the slow tests.
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) for k in
                                  ("pipeline", "transformer", "single_file")] + ["lora"])
def test_medium_layouts_predict_like_diffusers(medium, kind):
    pair = load_pair_from_paths(medium["base"], medium[kind], **CPU)
    assert type(pair) is (SD3LoraPair if kind == "lora" else SD3Pair)
    assert pair.family == SD3_FAMILY and pair.vae.dtype == torch.float32
    assert pair.latent_shape == (16, 16, 16) and pair.image_size == 32
    assert pair.describe()["variant"] == "3.5-medium"
    z, t = _inputs(pair.latent_shape)
    v_ft, v_pre = _velocities(pair, z, t)
    torch.testing.assert_close(v_pre, _reference_velocity(_reference_pipeline(medium, "base"),
                                                          z, t))
    torch.testing.assert_close(v_ft, _reference_velocity(_reference_pipeline(medium, kind), z, t))
    assert (v_ft - v_pre).abs().max() > 1e-3
    if kind == "lora":  # ONE transformer and one set of encoders, adapter switched on and off
        assert pair.unet_finetuned is pair.unet_pretrained
        assert len(pair.unet_adapter) > 0 and len(pair.text_encoder_adapter) > 0
        assert (pair.default_prompt, pair.default_prompt_source) == ("a painting in sks style",
                                                                     "model_card")


def test_kohya_lora_converts_to_the_diffusers_lora_with_the_same_weights(medium, tmp_path):
    """sd-scripts' SD3 LoRA (fused qkv with one down matrix, alpha, the pre-only last context
    modulation and the final layer in Stability's (shift, scale) order, the embedders, CLIP-L
    layers) becomes exactly the diffusers LoRA of the same weights, and is recognised as an
    SD 3.x LoRA by the registry alone."""
    from cgidm_core import families
    from cgidm_core.models.formats import safetensors_keys
    from cgidm_core.models.sd3_kohya_lora import convert_kohya_sd3_lora

    kohya, diffusers_lora = tiny_families.make_sd3_kohya_lora(medium["base"], tmp_path, seed=6)
    assert detect_finetuned_kind(kohya) == "lora"
    assert families.get(SD3_FAMILY) in families.file_claims(safetensors_keys(kohya), "lora")
    ours = convert_kohya_sd3_lora(load_file(kohya))
    theirs = load_file(diffusers_lora / "pytorch_lora_weights.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, rtol=0, atol=1e-7)


@pytest.mark.slow
def test_kohya_lora_predicts_like_the_diffusers_lora_in_the_pipeline(medium, tmp_path):
    """The kohya file through cgidm's loader gives the velocity StableDiffusion3Pipeline gives
    with the diffusers LoRA of the same weights (``load_lora_weights``), on both the transformer
    and CLIP-L; the pretrained side is the base's."""
    kohya, diffusers_lora = tiny_families.make_sd3_kohya_lora(medium["base"], tmp_path, seed=6)
    pair = load_pair_from_paths(medium["base"], kohya, **CPU)
    assert type(pair) is SD3LoraPair and len(pair.text_encoder_adapter) > 0
    z, t = _inputs(pair.latent_shape)
    v_ft, v_pre = _velocities(pair, z, t)
    models = {**medium, "lora": diffusers_lora}
    torch.testing.assert_close(v_ft, _reference_velocity(_reference_pipeline(models, "lora"), z,
                                                         t))
    torch.testing.assert_close(v_pre, _reference_velocity(_reference_pipeline(models, "base"), z,
                                                          t))
    assert (v_ft - v_pre).abs().max() > 1e-3


@pytest.mark.slow
def test_large_layout_and_a_pipeline_without_t5(tmp_path):
    """3.5 large's layout (qk norm, no dual attention); a base saved without T5 gets zeros in
    T5's place, as the pipeline does."""
    base = tiny_families.make_tiny_sd3(tmp_path / "large", layout="3.5-large", seed=7,
                                       with_t5=False)
    models = {"base": base,
              "transformer": tiny_families.make_sd3_transformer_folder(base, tmp_path / "db",
                                                                       seed=8)}
    pair = load_pair_from_paths(base, models["transformer"], **CPU)
    assert pair.describe()["variant"] == "3.5-large" and pair.tokenizer_3 is None
    z, t = _inputs(pair.latent_shape, batch=1)
    v_ft, v_pre = _velocities(pair, z, t)
    torch.testing.assert_close(v_ft, _reference_velocity(
        _reference_pipeline(models, "transformer"), z, t))
    torch.testing.assert_close(v_pre, _reference_velocity(_reference_pipeline(models, "base"),
                                                          z, t))


def test_forward_process_and_latent_codec_match_the_pipeline(medium):
    pair = load_pair_from_paths(medium["base"], medium["transformer"], **CPU)
    z0, t = _inputs(pair.latent_shape)
    noise = torch.randn_like(z0)
    s = t.float() / 1000
    sigma = (3.0 * s / (1 + 2.0 * s)).view(-1, 1, 1, 1)
    torch.testing.assert_close(pair.add_noise(z0, noise, t), (1 - sigma) * z0 + sigma * noise)
    torch.testing.assert_close(pair.loss_target(z0, noise, t), noise - z0)
    pipe = _reference_pipeline(medium, "base")
    with torch.no_grad():
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        mean = pipe.vae.encode(x).latent_dist.mean
        torch.testing.assert_close(pair.encode(x), (mean - 0.0609) * 1.5305)


@pytest.mark.slow
def test_lora_text_encoders_are_released_and_reloaded_exactly(medium):
    kept = load_pair_from_paths(medium["base"], medium["lora"], **CPU, keep_text_encoders=True)
    released = load_pair_from_paths(medium["base"], medium["lora"], **CPU)
    first = released.conditioning(PROMPT)
    assert not released.text_encoders_loaded
    again = released.conditioning("a painting")
    for prompt, cond in ((PROMPT, first), ("a painting", again)):
        expected = kept.conditioning(prompt)
        for ours, theirs in zip((*cond.finetuned, *cond.pretrained),
                                (*expected.finetuned, *expected.pretrained), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.equal(first.finetuned[1], first.pretrained[1])  # CLIP-L LoRA: pooled differs


@pytest.mark.slow
def test_pipeline_fine_tune_with_its_own_clip(medium, tmp_path):
    from transformers import CLIPTextModelWithProjection

    folder = tiny_families.make_sd3_full_finetune(medium["base"], tmp_path / "own", seed=9,
                                                  clip_seed=10)
    pair = load_pair_from_paths(medium["base"], folder, **CPU)
    pair.conditioning(PROMPT)  # released, then read back from both folders for a new prompt
    pipe = _reference_pipeline(medium, "base")
    pipe.transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer")
    pipe.text_encoder = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder")
    z, t = _inputs(pair.latent_shape, batch=1)
    v_ft, _ = _velocities(pair, z, t, prompt="a painting")
    torch.testing.assert_close(v_ft, _reference_velocity(pipe, z, t, prompt="a painting"))


@pytest.mark.slow
def test_pretrained_single_file_takes_the_rest_from_a_folder(medium, tmp_path):
    from safetensors.torch import save_file

    transformer = tiny_families.load_sd3_transformer(medium["base"])
    file = tmp_path / "sd3.5_medium.safetensors"
    state = tiny_families.sd3_transformer_to_stability(transformer.state_dict(), 2)
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in state.items()}, str(file))
    with pytest.raises(Exception, match="--pretrained-config"):
        load_pair_from_paths(file, medium["transformer"], **CPU)
    pair = load_pair_from_paths(file, medium["transformer"], pretrained_config=medium["base"],
                                **CPU)
    reference = load_pair_from_paths(medium["base"], medium["transformer"], **CPU)
    z, t = _inputs(pair.latent_shape, batch=1)
    for ours, theirs in zip(_velocities(pair, z, t), _velocities(reference, z, t), strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.slow
def test_refusals_name_the_problem(medium, tmp_path):
    kohya, _ = tiny_families.make_sd3_kohya_lora(medium["base"], tmp_path / "kohya", seed=6)
    t5 = tmp_path / "kohya_t5.safetensors"  # sd-scripts' --train_t5xxl layers
    layer = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    save_file({**load_file(kohya), f"{layer}.lora_down.weight": torch.zeros(4, 8),
               f"{layer}.lora_up.weight": torch.zeros(8, 4)}, str(t5))
    with pytest.raises(ModelFormatError, match="T5 .*lora_te3_.*retrain without --train_t5xxl"):
        load_pair_from_paths(medium["base"], t5, **CPU)
    large = tiny_families.make_tiny_sd3(tmp_path / "large", layout="3.5-large", seed=11)
    with pytest.raises(IncompatiblePairError, match="dual_attention_layers"):
        load_pair_from_paths(large, medium["transformer"], **CPU)
    controlnet = tmp_path / "cn"
    shutil.copytree(medium["base"], controlnet)
    index = json.loads((controlnet / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusion3ControlNetPipeline"
    (controlnet / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelFamilyError, match="text-to-image StableDiffusion3"):
        load_pair_from_paths(controlnet, medium["transformer"], **CPU)
    with pytest.raises(IncompatiblePairError):
        load_pair_from_paths(medium["base"], medium["base"], **CPU)


@pytest.mark.slow
def test_check_cli_on_a_tiny_sd35_lora(medium, tmp_path):
    pictures = sorted((SHARED_DATA / "wikiart-vangogh" / "membership").glob("*.jpg"))[:1]
    out = tmp_path / "out"
    assert main(["check", "--pretrained", str(medium["base"]), "--finetuned",
                 str(medium["lora"]), "--steps", "1", "--out", str(out),
                 *map(str, pictures)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["settings"]["pair"]["family"] == SD3_FAMILY
    assert doc["settings"]["prompt"] == "a painting in sks style"
