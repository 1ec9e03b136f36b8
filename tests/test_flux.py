"""Flux.1 pairs: every layout predicts the velocity diffusers' own FluxPipeline computes.

References come from ``FluxPipeline`` itself (``encode_prompt`` for CLIP pooled + T5, its own
``_pack_latents`` / ``_prepare_latent_image_ids`` / ``_unpack_latents``, the scheduler's
``time_shift`` with ``calculate_shift``'s ``mu``, ``load_lora_weights`` for every LoRA format),
so a pair that mixed up packing, ids, the timestep scale, the shift, the guidance or the adapter
fails here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from cgidm.cli import main
from cgidm_core import InversionConfig, authenticate
from cgidm_core.errors import (
    ConfigError,
    IncompatiblePairError,
    ModelFormatError,
    UnsupportedModelFamilyError,
)
from cgidm_core.models import detect_finetuned_kind, load_pair_from_paths
from cgidm_core.models.flux import FluxLoraPair, FluxPair, pack_latents, unpack_latents
from cgidm_core.models.formats import FLUX_FAMILY, pipeline_family, transformer_family
from cgidm_testkit import tinymodels
from tests.paths import SHARED_DATA

PROMPT = "sks style"
CPU = {"device": "cpu"}
KOHYA_METADATA = {
    "ss_output_name": "vangogh_flux",
    "ss_tag_frequency": json.dumps({"10_sks style": {"sks style": 10, "painting": 4}}),
    "ss_guidance_scale": "1.0",
    "ss_timestep_sampling": "shift",
    "ss_discrete_flow_shift": "3.1582",
}
VANGOGH = SHARED_DATA / "wikiart-vangogh"
LORAS = ("lora", "kohya", "xlabs")


@pytest.fixture(scope="module")
def dev(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux-dev")
    base = tinymodels.make_tiny_flux(root / "base", variant="dev")
    return {
        "base": base,
        "pipeline": tinymodels.make_flux_full_finetune(base, root / "full"),
        "transformer": tinymodels.make_flux_transformer_folder(base, root / "db", seed=3),
        "single_file": tinymodels.make_flux_single_file(base, root / "ft.safetensors", seed=4),
        "lora": tinymodels.make_flux_lora(base, root / "lora", seed=5),
        "kohya": tinymodels.make_flux_kohya_lora(
            base, root / "kohya" / "vangogh_flux.safetensors", seed=6, metadata=KOHYA_METADATA
        ),
        "xlabs": tinymodels.make_flux_xlabs_lora(base, root / "xlabs" / "lora.safetensors",
                                                 seed=7),
    }


@pytest.fixture(scope="module")
def schnell(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux-schnell")
    base = tinymodels.make_tiny_flux(root / "base", variant="schnell", seed=10)
    return {
        "base": base,
        "transformer": tinymodels.make_flux_transformer_folder(base, root / "db", seed=11),
        "lora": tinymodels.make_flux_lora(base, root / "lora", seed=12),
    }


def _reference_pipeline(models: dict[str, Path], kind: str) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(models["base"], local_files_only=True)
    if kind == "base":
        return pipe
    if kind == "kohya":
        _load_kohya_reference(pipe, models[kind])
        return pipe
    if kind in LORAS:
        lora = models[kind]
        pipe.load_lora_weights(str(lora.parent if lora.is_file() else lora),
                               **({"weight_name": lora.name} if lora.is_file() else {}))
        return pipe
    folder = models[kind]
    if kind == "single_file":
        folder = folder.parent / f"{folder.stem}_diffusers"
    pipe.transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    return pipe


def _load_kohya_reference(pipe: FluxPipeline, file: Path) -> None:
    """The transformer layers through diffusers' loader; the CLIP layers merged by hand
    (W + up @ down * alpha / rank), because diffusers 0.42's ``load_lora_weights`` fails on a
    kohya Flux LoRA that trained CLIP (``flux_loading.peft_text_encoder_keys``)."""
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    pipe.load_lora_weights({k: v for k, v in tensors.items() if k.startswith("lora_unet_")})
    pattern = re.compile(r"lora_te1_text_model_encoder_layers_(\d+)_self_attn_(\w+)_proj$")
    with torch.no_grad():
        for key, down in tensors.items():
            if not (key.startswith("lora_te1_") and key.endswith(".lora_down.weight")):
                continue
            name = key[: -len(".lora_down.weight")]
            layer, proj = pattern.match(name).groups()
            module = pipe.text_encoder.encoder.layers[int(layer)].self_attn
            linear = getattr(module, f"{proj}_proj")
            scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
            linear.weight += tensors[f"{name}.lora_up.weight"] @ down * scale


def _reference_sigmas(pipe: FluxPipeline, z: torch.Tensor, t: torch.Tensor,
                      shift: float | None = None) -> torch.Tensor:
    """``s`` for integer ``t`` as FluxPipeline shifts its sigmas at this image size (or with a
    fixed ``shift``)."""
    s = t.float() / 1000
    config = pipe.scheduler.config
    if shift is not None:
        return shift * s / (1 + (shift - 1) * s)
    if config.use_dynamic_shifting:
        tokens = (z.shape[-2] // 2) * (z.shape[-1] // 2)
        mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len,
                             config.base_shift, config.max_shift)
        return pipe.scheduler.time_shift(mu, 1.0, s)
    return config.shift * s / (1 + (config.shift - 1) * s)


def _reference_velocity(pipe: FluxPipeline, z, t, prompt=PROMPT, guidance=3.5, shift=None):
    batch, channels, height, width = z.shape
    length = 512 if pipe.transformer.config.guidance_embeds else 256
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(prompt, prompt_2=None, device="cpu",
                                                      max_sequence_length=length)
        packed = pipe._pack_latents(z, batch, channels, height, width)
        ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", z.dtype)
        guide = None
        if pipe.transformer.config.guidance_embeds:
            guide = torch.full((batch,), guidance, dtype=torch.float32)
        out = pipe.transformer(
            hidden_states=packed, timestep=_reference_sigmas(pipe, z, t, shift), guidance=guide,
            pooled_projections=pooled.expand(batch, -1),
            encoder_hidden_states=embeds.expand(batch, -1, -1), txt_ids=text_ids, img_ids=ids,
        ).sample
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(out, height * scale, width * scale, scale)


def _inputs(shape, batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=generator), torch.tensor([20, 700][:batch])


def _velocities(pair, z, t, prompt=PROMPT):
    cond = pair.conditioning(prompt)
    with torch.no_grad():
        return pair.eps_finetuned(z, t, cond), pair.eps_pretrained(z, t, cond)


def _pictures(n: int) -> list[Path]:
    return sorted((VANGOGH / "membership").glob("*.jpg"))[:n]


# -- detection ---------------------------------------------------------------------------------


def test_detects_flux_and_every_layout(dev, schnell, tmp_path):
    assert pipeline_family(dev["base"]) == pipeline_family(schnell["base"]) == FLUX_FAMILY
    expected = {"pipeline": "pipeline", "transformer": "dreambooth",
                "single_file": "single_file", "lora": "lora", "kohya": "lora", "xlabs": "lora"}
    assert {k: detect_finetuned_kind(dev[k]) for k in expected} == expected
    # a transformer folder saved without the transformer/ level
    bare = tmp_path / "bare"
    shutil.copytree(dev["transformer"] / "transformer", bare)
    assert detect_finetuned_kind(bare) == "dreambooth"
    # Black Forest Labs' naming (with and without ComfyUI's prefix) is a Flux transformer
    bfl = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"]
    assert transformer_family(bfl) == FLUX_FAMILY
    assert transformer_family(["model.diffusion_model." + k for k in bfl]) == FLUX_FAMILY
    assert transformer_family(["model.diffusion_model.input_blocks.0.0.weight"]) is None


# -- every layout predicts what diffusers predicts ---------------------------------------------


@pytest.mark.parametrize("kind", ["pipeline", "transformer", "single_file", *LORAS])
def test_dev_layouts_predict_like_diffusers(dev, kind):
    pair = load_pair_from_paths(dev["base"], dev[kind], **CPU)
    assert type(pair) is (FluxLoraPair if kind in LORAS else FluxPair)
    assert pair.family == FLUX_FAMILY and pair.vae.dtype == torch.float32
    assert pair.latent_shape == (16, 16, 16) and pair.image_size == 32
    # kohya's recorded training settings are honoured: ss_guidance_scale, and the fixed shift
    # of ss_timestep_sampling=shift / ss_discrete_flow_shift instead of the dynamic one
    guidance, shift = (1.0, 3.1582) if kind == "kohya" else (3.5, None)
    assert pair.guidance == guidance and pair.flow_shift_override == shift
    z, t = _inputs(pair.latent_shape)
    v_ft, v_pre = _velocities(pair, z, t)
    torch.testing.assert_close(v_pre, _reference_velocity(
        _reference_pipeline(dev, "base"), z, t, guidance=guidance, shift=shift))
    torch.testing.assert_close(v_ft, _reference_velocity(
        _reference_pipeline(dev, kind), z, t, guidance=guidance, shift=shift))
    assert (v_ft - v_pre).abs().max() > 1e-3
    if kind in LORAS:  # ONE transformer, adapter switched on and off
        assert pair.unet_finetuned is pair.unet_pretrained
        assert len(pair.unet_adapter) > 0
        assert (len(pair.text_encoder_adapter) > 0) == (kind == "kohya")


@pytest.mark.parametrize("kind", ["transformer", "lora"])
def test_schnell_has_no_guidance_and_uniform_time(schnell, kind):
    pair = load_pair_from_paths(schnell["base"], schnell[kind], **CPU)
    assert pair.guidance is None and pair.max_sequence_length == 256
    z, t = _inputs(pair.latent_shape)
    assert pair.shift_for(z) == 1.0
    v_ft, v_pre = _velocities(pair, z, t)
    torch.testing.assert_close(v_pre, _reference_velocity(_reference_pipeline(schnell, "base"),
                                                          z, t))
    torch.testing.assert_close(v_ft, _reference_velocity(_reference_pipeline(schnell, kind),
                                                         z, t))


def test_packing_round_trips_and_matches_diffusers():
    z = torch.randn(2, 16, 6, 8)
    packed = pack_latents(z)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(z, 2, 16, 6, 8))
    torch.testing.assert_close(unpack_latents(packed, 6, 8), z)


def test_flow_forward_process_uses_the_shift_of_the_run_size(dev):
    pair = load_pair_from_paths(dev["base"], dev["transformer"], **CPU)
    pipe = _reference_pipeline(dev, "base")
    for side in (16, 24):  # native latent side, and a larger run
        z0, t = _inputs((16, side, side))
        noise = torch.randn_like(z0)
        s = _reference_sigmas(pipe, z0, t).view(-1, 1, 1, 1)
        torch.testing.assert_close(pair.add_noise(z0, noise, t), (1 - s) * z0 + s * noise)
        torch.testing.assert_close(pair.loss_target(z0, noise, t), noise - z0)
    assert pair.shift_for(torch.empty(1, 16, 24, 24)) > pair.shift_for(torch.empty(1, 16, 16, 16))
    with torch.no_grad():  # the VAE latent is shifted and scaled as FluxPipeline undoes it
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        mean = pipe.vae.encode(x).latent_dist.mean
        torch.testing.assert_close(pair.encode(x), (mean - 0.1159) * 0.3611)


def test_text_encoders_are_released_and_reloaded_exactly(dev):
    kept = load_pair_from_paths(dev["base"], dev["kohya"], **CPU, keep_text_encoders=True)
    released = load_pair_from_paths(dev["base"], dev["kohya"], **CPU)
    first = released.conditioning(PROMPT)
    assert not released.text_encoders_loaded
    assert released.resident_bytes() < kept.resident_bytes()
    again = released.conditioning("a painting")  # a new prompt reads the encoders back
    for prompt, cond in ((PROMPT, first), ("a painting", again)):
        expected = kept.conditioning(prompt)
        for ours, theirs in zip((*cond.finetuned, *cond.pretrained),
                                (*expected.finetuned, *expected.pretrained), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # the CLIP LoRA makes the fine-tuned pooled feature differ; T5 is the base's for both
    assert not torch.equal(first.finetuned[1], first.pretrained[1])
    torch.testing.assert_close(first.finetuned[0], first.pretrained[0])


def test_a_pipeline_fine_tune_with_its_own_clip_uses_it_and_shares_t5(dev, tmp_path):
    from transformers import CLIPTextModel

    folder = tinymodels.make_flux_full_finetune(dev["base"], tmp_path / "full_clip", seed=21)
    clip = tinymodels.perturb_(CLIPTextModel.from_pretrained(folder / "text_encoder"), seed=22)
    shutil.rmtree(folder / "text_encoder")
    clip.save_pretrained(folder / "text_encoder", safe_serialization=True)
    kept = load_pair_from_paths(dev["base"], folder, **CPU, keep_text_encoders=True)
    assert kept.text_encoder_finetuned is not kept.text_encoder_pretrained
    assert kept.text_encoder_finetuned.text_encoder_2 is kept.text_encoder_pretrained.text_encoder_2
    assert kept.describe()["finetuned_own_text_encoders"] == ["text_encoder"]
    released = load_pair_from_paths(dev["base"], folder, **CPU)
    released.conditioning(PROMPT)
    cond = released.conditioning("a painting")  # read back from disk, own CLIP included
    expected = kept.conditioning("a painting")
    for ours, theirs in zip((*cond.finetuned, *cond.pretrained),
                            (*expected.finetuned, *expected.pretrained), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.equal(cond.finetuned[1], cond.pretrained[1])  # CLIP pooled differs
    pipe = _reference_pipeline(dev, "pipeline")
    pipe.transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    pipe.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    z, t = _inputs(kept.latent_shape)
    v_ft, _ = _velocities(kept, z, t)
    torch.testing.assert_close(v_ft, _reference_velocity(pipe, z, t))


def test_a_pipeline_fine_tune_with_its_own_t5_is_conditioned_with_it(dev, tmp_path):
    """A fine-tune whose ``text_encoder_2/`` differs from the base's: the fine-tuned model sees
    its own T5 (and the base's CLIP), the pretrained one the base's T5; both are released after
    encoding and read back from their own folders for a new prompt."""
    from transformers import T5EncoderModel

    folder = tinymodels.make_flux_full_finetune(dev["base"], tmp_path / "full_t5", seed=23,
                                                t5_seed=24)
    kept = load_pair_from_paths(dev["base"], folder, **CPU, keep_text_encoders=True)
    own, base = kept.text_encoder_finetuned, kept.text_encoder_pretrained
    assert own is not base and own.text_encoder is base.text_encoder  # CLIP identical: shared
    assert own.text_encoder_2 is not base.text_encoder_2
    assert kept.describe()["finetuned_own_text_encoders"] == ["text_encoder_2"]
    released = load_pair_from_paths(dev["base"], folder, **CPU)
    first = released.conditioning(PROMPT)
    assert not released.text_encoders_loaded
    again = released.conditioning("a painting")  # both T5s read back from their folders
    for prompt, cond in ((PROMPT, first), ("a painting", again)):
        expected = kept.conditioning(prompt)
        for ours, theirs in zip((*cond.finetuned, *cond.pretrained),
                                (*expected.finetuned, *expected.pretrained), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.equal(first.finetuned[0], first.pretrained[0])  # T5 hidden states differ
    torch.testing.assert_close(first.finetuned[1], first.pretrained[1])  # CLIP pooled shared
    pipe = _reference_pipeline(dev, "base")
    pipe.transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    pipe.text_encoder_2 = T5EncoderModel.from_pretrained(folder / "text_encoder_2")
    z, t = _inputs(kept.latent_shape)
    for pair in (kept, released):
        v_ft, v_pre = _velocities(pair, z, t)
        torch.testing.assert_close(v_ft, _reference_velocity(pipe, z, t))
        torch.testing.assert_close(v_pre, _reference_velocity(_reference_pipeline(dev, "base"),
                                                              z, t))
    # a fine-tune whose only change is its T5 is a real pair, not "identical models"
    shutil.rmtree(folder / "transformer")
    shutil.copytree(dev["base"] / "transformer", folder / "transformer")
    t5_only = load_pair_from_paths(dev["base"], folder, **CPU)
    assert t5_only.unet_finetuned is t5_only.unet_pretrained
    # the usual pipeline fine-tune carries the base's T5 unchanged: one copy serves both
    usual = load_pair_from_paths(dev["base"], dev["pipeline"], **CPU, keep_text_encoders=True)
    assert usual.text_encoder_finetuned is usual.text_encoder_pretrained
    assert usual.describe()["finetuned_own_text_encoders"] == []


def test_pretrained_single_file_transformer_takes_the_rest_from_a_folder(dev, tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "flux1-dev.safetensors"
    state = tinymodels.load_flux_transformer(dev["base"]).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    with pytest.raises(ConfigError, match="--pretrained-config"):
        load_pair_from_paths(file, dev["transformer"], **CPU)
    pair = load_pair_from_paths(file, dev["transformer"], pretrained_config=dev["base"], **CPU)
    reference = load_pair_from_paths(dev["base"], dev["transformer"], **CPU)
    z, t = _inputs(pair.latent_shape)
    for ours, theirs in zip(_velocities(pair, z, t), _velocities(reference, z, t), strict=True):
        torch.testing.assert_close(ours, theirs)
    with pytest.raises(ConfigError, match="pretrained_config"):
        load_pair_from_paths(dev["base"], dev["transformer"], pretrained_config=dev["base"], **CPU)
    out = tmp_path / "out"  # the same from the command line, recorded in the provenance
    assert main(["check", "--pretrained", str(file), "--pretrained-config", str(dev["base"]),
                 "--finetuned", str(dev["transformer"]), "--prompt", PROMPT, "--steps", "1",
                 "--out", str(out), str(_pictures(1)[0])]) == 0
    doc = json.loads((out / "results.json").read_text())
    models = doc["provenance"]["models"]
    assert models["pretrained"]["files"] and models["pretrained_config"]["files"]
    assert main(["verify", str(out / "results.json"), "--images", str(_pictures(1)[0])]) == 0


def test_a_full_size_flux_dev_pair_builds_on_the_meta_device():
    """FLUX.1-dev's architecture (diffusers' defaults are its config), built without memory: the
    pair needs no weights to be constructed, so its parameters can be counted."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from cgidm_core.models.flux import FluxTextEncoders

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)
        vae = AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                            sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                            use_quant_conv=False, use_post_quant_conv=False)
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                                     num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu"))
    encoders = FluxTextEncoders(clip, t5)
    pair = FluxPair(vae=vae, tokenizer=None, tokenizer_2=None, guidance=None,
                    scheduler_config={"use_dynamic_shifting": True}, alphas_cumprod=None,
                    unet_pretrained=transformer, unet_finetuned=transformer,
                    text_encoder_pretrained=encoders, text_encoder_finetuned=encoders,
                    prediction_type="flow", device=torch.device("cpu"), dtype=torch.bfloat16)
    assert (pair.image_size, pair.latent_shape, pair.guidance) == (1024, (16, 128, 128), 3.5)
    assert pair.shift_for(torch.empty(0, *pair.latent_shape)) == pytest.approx(3.158, abs=1e-3)
    count = sum(p.numel() for p in transformer.parameters())
    assert 11.8e9 < count < 12.0e9  # FLUX.1's "12B"
    assert 4.7e9 < sum(p.numel() for p in t5.parameters()) < 4.8e9


# -- the method on a Flux pair -------------------------------------------------------------------


def test_batch_independence_and_same_seed_reproducibility(dev):
    pair = load_pair_from_paths(dev["base"], dev["kohya"], **CPU)
    config = InversionConfig(steps=3, seed=2)
    pictures = _pictures(3)
    together = authenticate(pair, pictures, config=config, batch_size=3)
    alone = [authenticate(pair, [p], config=config, batch_size=1)[0] for p in pictures]
    again = authenticate(pair, pictures, config=config, batch_size=3)
    for a, b, c in zip(together, alone, again, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert a.score == c.score
    assert len({round(r.score, 6) for r in together}) == 3


@pytest.mark.parametrize("kind", ["transformer", "kohya"])
def test_gradient_checkpointing_switches_on_the_transformers_and_changes_no_score(dev, kind):
    # Flux is the family that needs it most (40 GiB of activations per 1024 px image without
    # it, devices.ACTIVATION_COUNTS["flux"]); a LoRA pair's one transformer must be recomputed
    # in the adapter state it ran in, or its gradient would be the other model's.
    import dataclasses

    pair = load_pair_from_paths(dev["base"], dev[kind], **CPU)
    assert pair.family == "flux" and pair.denoisers()
    config = InversionConfig(steps=3, seed=5)
    pictures = _pictures(2)
    off = authenticate(pair, pictures, config=dataclasses.replace(
        config, gradient_checkpointing="off"), batch_size=2)
    on = authenticate(pair, pictures, config=dataclasses.replace(
        config, gradient_checkpointing="on"), batch_size=2)
    assert pair.gradient_checkpointing
    assert all(t.is_gradient_checkpointing for t in pair.denoisers())
    for a, b in zip(off, on, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert a.metrics == pytest.approx(b.metrics, abs=1e-5)


def test_resolution_overrides_the_native_size(dev):
    pair = load_pair_from_paths(dev["base"], dev["lora"], **CPU)
    results = authenticate(pair, _pictures(1), prompt=PROMPT,
                           config=InversionConfig(steps=2, resolution=48), batch_size=1)
    assert results[0].recovered.size == (48, 48)
    with pytest.raises(ConfigError, match="multiple of 4"):
        authenticate(pair, _pictures(1), config=InversionConfig(steps=1, resolution=18))


def test_prompt_from_a_model_card_next_to_a_transformer_folder(dev, tmp_path):
    card = tmp_path / "db_card"
    shutil.copytree(dev["transformer"], card)
    (card / "README.md").write_text(
        "---\nbase_model: black-forest-labs/FLUX.1-dev\ninstance_prompt: a photo of sks dog\n"
        "---\n# Flux DreamBooth\n", encoding="utf-8")
    pair = load_pair_from_paths(dev["base"], card, **CPU)
    assert (pair.default_prompt, pair.default_prompt_source) == ("a photo of sks dog",
                                                                 "model_card")
    plain = load_pair_from_paths(dev["base"], dev["transformer"], **CPU)
    assert plain.default_prompt is None


def test_check_cli_on_a_tiny_flux_pair(dev, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["check", "--pretrained", str(dev["base"]), "--finetuned", str(dev["kohya"]),
                 "--steps", "2", "--out", str(out), *map(str, _pictures(2))])
    assert code == 0, capsys.readouterr()
    doc = json.loads((out / "results.json").read_text())
    settings = doc["settings"]
    assert settings["pair"]["family"] == FLUX_FAMILY
    assert settings["pair"]["finetuned_kind"] == "lora"
    assert settings["pair"]["variant"] == "dev" and settings["pair"]["guidance"] == 1.0
    assert settings["pair"]["time_shift_at_native_size"] == pytest.approx(3.1582)
    assert "ss_timestep_sampling" in settings["pair"]["time_shift_source"]
    assert (settings["prompt"], settings["prompt_source"]) == ("sks style",
                                                               "safetensors_metadata")
    assert len(doc["images"]) == 2
    assert all(Path(out / image["recovered"]).is_file() for image in doc["images"])


# -- refusals ----------------------------------------------------------------------------------


def _with_index(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    index = json.loads((target / "model_index.json").read_text())
    index.update(changes)
    (target / "model_index.json").write_text(json.dumps(index))
    return target


def test_sd3_files_on_a_flux_base_and_flux_variants_are_refused_by_name(dev, tmp_path):
    # SD 3.x has its own adapter (tests/test_sd3.py): here its files meet a Flux.1 base
    sd3 = _with_index(dev["base"], tmp_path / "sd3", _class_name="StableDiffusion3Pipeline")
    with pytest.raises(UnsupportedModelFamilyError, match="text-to-image StableDiffusion3"):
        load_pair_from_paths(sd3, dev["transformer"], **CPU)
    sd3_transformer = tmp_path / "sd3_ft"
    (sd3_transformer / "transformer").mkdir(parents=True)
    (sd3_transformer / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(IncompatiblePairError, match="Stable Diffusion 3"):
        load_pair_from_paths(dev["base"], sd3_transformer, **CPU)
    from safetensors.torch import save_file

    sd3_file = tmp_path / "sd3.5_large.safetensors"  # Stability's naming, as shared on Civitai
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, str(sd3_file))
    assert detect_finetuned_kind(sd3_file) == "single_file"
    with pytest.raises(IncompatiblePairError, match="Stable Diffusion 3"):
        load_pair_from_paths(dev["base"], sd3_file, **CPU)
    with pytest.raises(ConfigError, match="Stable Diffusion 3.x pipeline folder"):
        load_pair_from_paths(sd3_file, dev["transformer"], **CPU)
    with pytest.raises(IncompatiblePairError, match="not a Stable Diffusion 3.x pipeline"):
        load_pair_from_paths(sd3_file, dev["transformer"], pretrained_config=dev["base"], **CPU)
    fill = _with_index(dev["base"], tmp_path / "fill", _class_name="FluxFillPipeline")
    with pytest.raises(UnsupportedModelFamilyError, match="FluxFillPipeline"):
        load_pair_from_paths(fill, dev["transformer"], **CPU)
    control = tmp_path / "control"
    shutil.copytree(dev["base"], control)
    config_file = control / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "in_channels": 128}))
    with pytest.raises(UnsupportedModelFamilyError, match="Fill/control"):
        load_pair_from_paths(control, dev["transformer"], **CPU)


def test_mismatched_pairs_are_incompatible(dev, schnell, tiny_sd_pair, tmp_path):
    with pytest.raises(IncompatiblePairError, match="Flux.1-schnell"):
        load_pair_from_paths(dev["base"], schnell["transformer"], **CPU)
    sd_base, _ = tiny_sd_pair
    # a kohya Flux.1 LoRA is also in a naming Chroma's loader takes: the message names both
    with pytest.raises(IncompatiblePairError, match="Flux.1 or Chroma LoRA but the pretrained "
                                                    "model is Stable Diffusion"):
        load_pair_from_paths(sd_base, dev["kohya"], **CPU)
    with pytest.raises(IncompatiblePairError, match="Flux.1 single-file"):
        load_pair_from_paths(sd_base, dev["single_file"], **CPU)
    with pytest.raises(IncompatiblePairError, match="Flux.1 fine-tuned denoiser folder"):
        load_pair_from_paths(sd_base, dev["transformer"], **CPU)
    sd_lora = tinymodels.make_lora(sd_base, tmp_path / "sd_lora")
    with pytest.raises(IncompatiblePairError, match="pretrained model is Flux.1"):
        load_pair_from_paths(dev["base"], sd_lora, **CPU)
    sd_db = tinymodels.make_dreambooth_folder(sd_base, tmp_path / "sd_db")
    with pytest.raises(IncompatiblePairError, match="pretrained model is Flux.1"):
        load_pair_from_paths(dev["base"], sd_db, **CPU)
    with pytest.raises(IncompatiblePairError, match="Stable Diffusion 1.x/2.x pipeline"):
        load_pair_from_paths(dev["base"], tiny_sd_pair[1], **CPU)
    with pytest.raises(IncompatiblePairError, match="nothing to contrast"):
        load_pair_from_paths(dev["base"], dev["base"], **CPU)


def test_a_corrupt_single_file_is_a_format_error(dev, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(dev["single_file"].read_bytes()[:1000])
    with pytest.raises(ModelFormatError):
        load_pair_from_paths(dev["base"], broken, **CPU)
