"""SDXL pairs: every fine-tune layout predicts what diffusers' own SDXL pipeline predicts.

References come from ``StableDiffusionXLPipeline`` itself (its ``encode_prompt`` for the two text
encoders and the pooled embedding, its ``load_lora_weights`` for LoRAs), so a pair that mixed up
encoders, hidden-state layers, time ids or adapters fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from cgidm.cli import main
from cgidm_core import InversionConfig, authenticate
from cgidm_core.errors import (
    ConfigError,
    IncompatiblePairError,
    ModelFormatError,
    UnsupportedModelFamilyError,
)
from cgidm_core.models import detect_finetuned_kind, load_pair_from_paths
from cgidm_core.models.formats import SDXL_FAMILY, pipeline_family
from cgidm_core.models.sdxl import StableDiffusionXLLoraPair, StableDiffusionXLPair
from cgidm_core.prompts import EmptyPromptWarning
from cgidm_testkit import tinymodels
from tests.paths import require_shared_data

PROMPT = "sks style"
CPU = {"device": "cpu"}
KOHYA_METADATA = {
    "ss_output_name": "vangogh_xl",
    "ss_tag_frequency": json.dumps({"10_sks style": {"sks style": 10, "painting": 4, "sky": 2}}),
}


@pytest.fixture(scope="module")
def xl(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdxl")
    base = tinymodels.make_tiny_sdxl(root / "base")
    return {
        "base": base,
        "pipeline": tinymodels.make_full_finetune(base, root / "full"),
        "dreambooth": tinymodels.make_dreambooth_folder(
            base, root / "db", ("text_encoder", "text_encoder_2")
        ),
        "dreambooth_te1": tinymodels.make_dreambooth_folder(base, root / "db_te1"),
        "dreambooth_unet_only": tinymodels.make_dreambooth_folder(base, root / "db_unet", ()),
        "lora": tinymodels.make_sdxl_lora(base, root / "lora", seed=5),
        "kohya": tinymodels.make_sdxl_kohya_lora(
            base, root / "kohya" / "vangogh_xl.safetensors", seed=5, metadata=KOHYA_METADATA
        ),
        "single_file": tinymodels.make_sdxl_single_file(base, root / "single.safetensors"),
        "single_file_unet": tinymodels.make_sdxl_single_file(
            base, root / "single_unet.safetensors", seed=7, text_encoders=False
        ),
    }


def _reference_folder(xl: dict[str, Path], kind: str) -> Path:
    if kind.startswith("single_file"):
        file = xl[kind]
        return file.parent / f"{file.stem}_diffusers"
    return xl[kind]


def _reference_pipeline(xl: dict[str, Path], kind: str) -> StableDiffusionXLPipeline:
    """diffusers' SDXL pipeline with the fine-tune's networks (the base's where it has none)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(xl["base"], local_files_only=True)
    if kind == "base":
        return pipe
    if kind in ("lora", "kohya"):
        lora = xl[kind]
        pipe.load_lora_weights(str(lora.parent if lora.is_file() else lora),
                               **({"weight_name": lora.name} if lora.is_file() else {}))
        return pipe
    folder = _reference_folder(xl, kind)
    pipe.unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    for name in ("text_encoder", "text_encoder_2"):
        if (folder / name).is_dir():
            setattr(pipe, name, type(getattr(pipe, name)).from_pretrained(folder / name))
    return pipe


def _reference_eps(pipe: StableDiffusionXLPipeline, z, t, prompt=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        side = z.shape[-1] * 2  # the tiny VAE's two blocks: 2 pixels per latent
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32)
        return pipe.unet(
            z, t, encoder_hidden_states=embeds.expand(len(z), -1, -1),
            added_cond_kwargs={"text_embeds": pooled.expand(len(z), -1),
                               "time_ids": time_ids.expand(len(z), -1)},
        ).sample


def _inputs(shape, batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=generator), torch.tensor([20, 700][:batch])


def _eps(pair, z, t, prompt=PROMPT):
    cond = pair.conditioning(prompt)
    with torch.no_grad():
        return pair.eps_finetuned(z, t, cond), pair.eps_pretrained(z, t, cond)


def _pictures(n: int) -> list[Path]:
    return sorted(require_shared_data("wikiart-vangogh", "membership").glob("*.jpg"))[:n]


# -- detection ---------------------------------------------------------------------------------


def test_detects_sdxl_and_every_layout(xl):
    assert pipeline_family(xl["base"]) == SDXL_FAMILY
    expected = {
        "pipeline": "pipeline", "dreambooth": "dreambooth", "dreambooth_te1": "dreambooth",
        "dreambooth_unet_only": "dreambooth", "lora": "lora", "kohya": "lora",
        "single_file": "single_file", "single_file_unet": "single_file",
    }
    assert {k: detect_finetuned_kind(xl[k]) for k in expected} == expected


# -- every layout predicts what diffusers predicts ---------------------------------------------


@pytest.mark.parametrize("kind", [
    "pipeline", "dreambooth", "dreambooth_te1", "dreambooth_unet_only", "lora", "kohya",
    "single_file", "single_file_unet",
])
def test_layouts_predict_like_diffusers(xl, kind):
    pair = load_pair_from_paths(xl["base"], xl[kind], **CPU)
    lora = kind in ("lora", "kohya")
    assert type(pair) is (StableDiffusionXLLoraPair if lora else StableDiffusionXLPair)
    assert pair.family == SDXL_FAMILY
    assert pair.finetuned_kind == detect_finetuned_kind(xl[kind])
    assert pair.vae.dtype == torch.float32
    z, t = _inputs(pair.latent_shape)
    eps_ft, eps_pre = _eps(pair, z, t)
    torch.testing.assert_close(eps_pre, _reference_eps(_reference_pipeline(xl, "base"), z, t))
    torch.testing.assert_close(eps_ft, _reference_eps(_reference_pipeline(xl, kind), z, t))
    assert (eps_ft - eps_pre).abs().max() > 1e-3
    if lora:  # ONE UNet, adapter switched on and off
        assert pair.unet_finetuned is pair.unet_pretrained
        assert len(pair.unet_adapter) > 0 and len(pair.text_encoder_adapter) > 0


def test_kohya_lora_equals_the_same_lora_in_diffusers_format(xl):
    """Same weights written both ways (kohya SGM names + alpha, and peft/diffusers names)."""
    z, t = _inputs((4, 8, 8))
    eps_kohya, _ = _eps(load_pair_from_paths(xl["base"], xl["kohya"], **CPU), z, t)
    eps_diffusers, _ = _eps(load_pair_from_paths(xl["base"], xl["lora"], **CPU), z, t)
    torch.testing.assert_close(eps_kohya, eps_diffusers, rtol=1e-4, atol=1e-5)


def test_unchanged_text_encoders_are_shared(xl):
    pair = load_pair_from_paths(xl["base"], xl["pipeline"], **CPU, keep_text_encoders=True)
    assert pair.text_encoder_finetuned is pair.text_encoder_pretrained
    te1 = load_pair_from_paths(xl["base"], xl["dreambooth_te1"], **CPU, keep_text_encoders=True)
    assert te1.text_encoder_finetuned is not te1.text_encoder_pretrained
    assert te1.text_encoder_finetuned.text_encoder_2 is te1.text_encoder_pretrained.text_encoder_2
    assert len(te1.modules()) == 5  # two UNets, VAE, two encoder pairs (sharing text_encoder_2)


@pytest.mark.parametrize("kind", ["dreambooth_te1", "kohya", "single_file"])
def test_text_encoders_are_released_and_reloaded_exactly(xl, kind):
    kept = load_pair_from_paths(xl["base"], xl[kind], **CPU, keep_text_encoders=True)
    released = load_pair_from_paths(xl["base"], xl[kind], **CPU)
    first = released.conditioning(PROMPT)
    assert not released.text_encoders_loaded
    assert released.resident_bytes() < kept.resident_bytes()
    again = released.conditioning("a painting")  # a new prompt reads the encoders back
    for prompt, cond in ((PROMPT, first), ("a painting", again)):
        expected = kept.conditioning(prompt)
        for ours, theirs in zip((*cond.finetuned, *cond.pretrained),
                                (*expected.finetuned, *expected.pretrained), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_v_prediction_is_converted_to_eps(tmp_path):
    base = tinymodels.make_tiny_sdxl(tmp_path / "v_base", prediction_type="v_prediction")
    finetuned = tinymodels.make_dreambooth_folder(base, tmp_path / "v_ft", ())
    pair = load_pair_from_paths(base, finetuned, **CPU)
    assert pair.prediction_type == "v_prediction"
    z, t = _inputs(pair.latent_shape)
    _, eps_pre = _eps(pair, z, t)
    pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True)
    v = _reference_eps(pipe, z, t)
    abar = pair.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps_pre, abar.sqrt() * v + (1 - abar).sqrt() * z)


# -- resolution --------------------------------------------------------------------------------


def test_native_size_is_read_from_the_model_and_resolution_overrides_it(xl):
    pair = load_pair_from_paths(xl["base"], xl["kohya"], **CPU)
    assert (pair.image_size, pair.latent_shape) == (16, (4, 8, 8))
    z = torch.zeros(1, 4, 16, 16)
    assert pair.time_ids(z).tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    config = InversionConfig(steps=2, resolution=32)
    results = authenticate(pair, _pictures(1), config=config, batch_size=1)
    assert results[0].recovered.size == (32, 32)
    with pytest.raises(ConfigError, match="multiple of 4"):
        authenticate(pair, _pictures(1), config=InversionConfig(steps=1, resolution=18))


# -- the method on an SDXL pair ------------------------------------------------------------------


def test_batch_independence_and_same_seed_reproducibility(xl):
    pair = load_pair_from_paths(xl["base"], xl["dreambooth_te1"], **CPU)
    config = InversionConfig(steps=3, seed=2)
    pictures = _pictures(3)
    together = authenticate(pair, pictures, prompt=PROMPT, config=config, batch_size=3)
    alone = [authenticate(pair, [p], prompt=PROMPT, config=config, batch_size=1)[0]
             for p in pictures]
    again = authenticate(pair, pictures, prompt=PROMPT, config=config, batch_size=3)
    for a, b, c in zip(together, alone, again, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert a.score == c.score
    assert len({round(r.score, 6) for r in together}) == 3


# -- prompts -----------------------------------------------------------------------------------


def test_prompt_comes_from_kohya_metadata_and_model_cards(xl, tmp_path):
    kohya = load_pair_from_paths(xl["base"], xl["kohya"], **CPU)
    assert kohya.default_prompt == "sks style"
    assert kohya.default_prompt_source == "safetensors_metadata"
    card = tmp_path / "db_card"
    shutil.copytree(xl["dreambooth_unet_only"], card)
    (card / "README.md").write_text(
        "---\nlicense: openrail++\nbase_model: stabilityai/stable-diffusion-xl-base-1.0\n"
        "instance_prompt: a photo of sks dog\n---\n# DreamBooth\n", encoding="utf-8"
    )
    pair = load_pair_from_paths(xl["base"], card, **CPU)
    assert (pair.default_prompt, pair.default_prompt_source) == ("a photo of sks dog",
                                                                 "model_card")
    plain = load_pair_from_paths(xl["base"], xl["dreambooth_unet_only"], **CPU)
    assert plain.default_prompt is None
    with pytest.warns(EmptyPromptWarning, match="empty prompt"):
        authenticate(plain, _pictures(1), config=InversionConfig(steps=1))


def test_check_cli_on_a_tiny_sdxl_pair(xl, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["check", "--pretrained", str(xl["base"]), "--finetuned", str(xl["kohya"]),
                 "--steps", "2", "--resolution", "32", "--out", str(out),
                 *map(str, _pictures(2))])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    settings = doc["settings"]
    assert settings["pair"]["family"] == SDXL_FAMILY
    assert settings["pair"]["finetuned_kind"] == "lora"
    assert (settings["prompt"], settings["prompt_source"]) == ("sks style",
                                                               "safetensors_metadata")
    assert settings["inversion"]["resolution"] == 32
    assert len(doc["images"]) == 2
    printed = capsys.readouterr().out
    assert "sks style" in printed

    empty = tmp_path / "empty"
    assert main(["check", "--pretrained", str(xl["base"]), "--finetuned",
                 str(xl["dreambooth_unet_only"]), "--steps", "1", "--out", str(empty),
                 str(_pictures(1)[0])]) == 0
    settings = json.loads((empty / "results.json").read_text())["settings"]
    assert (settings["prompt"], settings["prompt_source"]) == ("", "empty")
    assert "empty prompt" in settings["prompt_warning"]
    assert "warning:" in capsys.readouterr().out


# -- refusals ----------------------------------------------------------------------------------


def test_refiner_and_unknown_families_are_refused_by_name(xl, tmp_path):
    refiner = tmp_path / "refiner"
    shutil.copytree(xl["base"], refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index.update({"_class_name": "StableDiffusionXLImg2ImgPipeline",
                  "text_encoder": [None, None], "tokenizer": [None, None],
                  "requires_aesthetics_score": True})
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelFamilyError, match="refiner"):
        load_pair_from_paths(refiner, xl["dreambooth"], **CPU)

    refiner_unet = tmp_path / "refiner_unet"
    shutil.copytree(xl["base"], refiner_unet)
    config_file = refiner_unet / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    # 5 time ids x 8 + one encoder whose width is also the cross-attention width
    config.update({"projection_class_embeddings_input_dim": 5 * 8 + 80})
    config_file.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelFamilyError, match="refiner"):
        load_pair_from_paths(refiner_unet, xl["dreambooth"], **CPU)

    other = tmp_path / "auraflow"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "AuraFlowPipeline",
                                                         "transformer": ["diffusers", "x"]}))
    with pytest.raises(UnsupportedModelFamilyError, match="AuraFlowPipeline"):
        load_pair_from_paths(other, xl["dreambooth"], **CPU)


def test_mixed_families_are_incompatible(xl, tiny_sd_pair, tmp_path):
    sd_base, _ = tiny_sd_pair
    with pytest.raises(IncompatiblePairError, match="SDXL"):
        load_pair_from_paths(sd_base, xl["dreambooth"], **CPU)
    with pytest.raises(IncompatiblePairError, match="SDXL LoRA"):
        load_pair_from_paths(sd_base, xl["kohya"], **CPU)
    sd_db = tinymodels.make_dreambooth_folder(sd_base, tmp_path / "sd_db")
    with pytest.raises(IncompatiblePairError, match="Stable Diffusion 1.x/2.x"):
        load_pair_from_paths(xl["base"], sd_db, **CPU)
    with pytest.raises(IncompatiblePairError, match="nothing to contrast"):
        load_pair_from_paths(xl["base"], xl["base"], **CPU)


def test_eval_baselines_run_at_the_chosen_resolution(xl):
    from cgidm_core.evaluation import score_images_detailed

    pair = load_pair_from_paths(xl["base"], xl["kohya"], **CPU)
    seen: list[tuple[int, ...]] = []
    encode = pair.encode
    pair.encode = lambda images: (seen.append(tuple(images.shape)), encode(images))[1]
    scored = score_images_detailed(pair, _pictures(2), "loss",
                                   config=InversionConfig(resolution=32), batch_size=2)
    assert seen == [(2, 3, 32, 32)] and len(scored.scores) == 2
    assert scored.settings["prompt_source"] == "safetensors_metadata"


def _fake_hub_snapshot(hub: Path, repo: str, source: Path) -> None:
    """What a Hugging Face cache holds after diffusers fetched a repo's configs (no weights)."""
    commit = "0" * 40
    root = hub / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    for file in source.rglob("*"):
        if file.suffix in (".json", ".txt"):
            (snapshot / file.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, snapshot / file.relative_to(source))


def test_single_file_sdxl_base_is_converted_once_and_predicts_like_its_folder(
    tmp_path, monkeypatch
):
    import huggingface_hub.constants

    base = tinymodels.make_tiny_sdxl(tmp_path / "base", text_encoder_2_layers=10)
    single = tinymodels.sdxl_pipeline_to_single_file(base, tmp_path / "sd_xl_base.safetensors")
    finetuned = tinymodels.make_dreambooth_folder(base, tmp_path / "db", ())
    monkeypatch.setenv("CGIDM_CACHE_DIR", str(tmp_path / "cgidm-cache"))
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    with pytest.raises(ModelFormatError, match="allow_network"):
        load_pair_from_paths(single, finetuned, **CPU)  # offline, no configs in the cache

    _fake_hub_snapshot(hub, "stabilityai/stable-diffusion-xl-base-1.0", base)
    pair = load_pair_from_paths(single, finetuned, **CPU)
    converted = list((tmp_path / "cgidm-cache" / "converted").iterdir())
    assert len(converted) == 1 and (converted[0] / "model_index.json").is_file()
    reference = load_pair_from_paths(base, finetuned, **CPU)
    z, t = _inputs(pair.latent_shape)
    for ours, theirs in zip(_eps(pair, z, t), _eps(reference, z, t), strict=True):
        torch.testing.assert_close(ours, theirs)
    stamp = (converted[0] / "model_index.json").stat().st_mtime_ns
    load_pair_from_paths(single, finetuned, **CPU)  # the cached conversion is reused
    assert (converted[0] / "model_index.json").stat().st_mtime_ns == stamp


def test_single_file_base_family_is_read_from_the_keys(tmp_path):
    from cgidm_core.models.single_file_base import single_file_base_family

    unet, vae = "model.diffusion_model.x", "first_stage_model.x"
    xl_keys = [unet, vae, "conditioner.embedders.1.model.x"]
    assert single_file_base_family(xl_keys, tmp_path) == SDXL_FAMILY
    sd_keys = [unet, vae, "cond_stage_model.x"]
    assert single_file_base_family(sd_keys, tmp_path) == "stable-diffusion"
    with pytest.raises(UnsupportedModelFamilyError, match="refiner"):
        single_file_base_family([unet, vae, "conditioner.embedders.0.model.x"], tmp_path)
    with pytest.raises(ModelFormatError, match="no VAE"):
        single_file_base_family([unet, "conditioner.embedders.1.model.x"], tmp_path)
    with pytest.raises(ModelFormatError, match="no UNet"):
        single_file_base_family(["lora_unet_x.lora_down.weight"], tmp_path)


def test_single_file_sd_base_is_converted_too(tmp_path, monkeypatch, tiny_sd_pair):
    import huggingface_hub.constants

    base, full = tiny_sd_pair
    single = tinymodels.pipeline_to_single_file(base, tmp_path / "v1-5.safetensors")
    monkeypatch.setenv("CGIDM_CACHE_DIR", str(tmp_path / "cgidm-cache"))
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    _fake_hub_snapshot(hub, "stable-diffusion-v1-5/stable-diffusion-v1-5", base)
    pair = load_pair_from_paths(single, full, **CPU)
    reference = load_pair_from_paths(base, full, **CPU)
    z, t = _inputs(pair.latent_shape)
    for ours, theirs in zip(_eps(pair, z, t), _eps(reference, z, t), strict=True):
        torch.testing.assert_close(ours, theirs)
