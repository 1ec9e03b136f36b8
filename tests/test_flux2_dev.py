"""Flux.2 dev: every layout predicts the velocity diffusers' own Flux2Pipeline computes.

References come from ``Flux2Pipeline`` itself: its ``encode_prompt`` (system message,
list-of-chunks conversation, Mistral-3 layers 10/20/30, text ids), ``_pack_latents``,
``_prepare_latent_ids``, ``_unpack_latents_with_ids``, its guidance tensor at the default 4.0,
``compute_empirical_mu`` at its default 50 steps through the scheduler's ``time_shift``,
``load_lora_weights`` and ``Flux2Transformer2DModel.from_single_file``; on a tiny random
FLUX.2-dev layout whose ``tokenizer/`` is a Pixtral processor folder, CPU.

The pipeline's tokenizer slot holds a Pixtral PROCESSOR, which transformers builds only with
torchvision (not installed here): the reference pipeline is given the folder's tokenizer with
the processor's chat template instead, and the one thing the processor does differently with
text (special tokens added unless the rendered text starts with BOS) is checked on the token ids
themselves (``test_prompt_tokens_are_the_processors``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cgidm_core.models import detect_finetuned_kind, load_pair_from_paths
from cgidm_core.models.formats import pipeline_family
from cgidm_core.names import FLUX2_DEV_FAMILY, FLUX2_FAMILY
from cgidm_testkit import tiny_families

PROMPT = "sks style"
CPU = {"device": "cpu"}


@pytest.fixture(scope="module")
def dev(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux2-dev")
    base = tiny_families.make_tiny_flux2_dev(root / "base")
    return {
        "base": base,
        "transformer": tiny_families.make_flux2_transformer_folder(base, root / "db", seed=3),
        "lora": tiny_families.make_flux2_dev_lora(base, root / "lora", seed=5),
    }


def _reference_pipeline(models: dict[str, Path], kind: str):
    """``Flux2Pipeline`` built from the base folder's parts (``from_pretrained`` would check the
    tokenizer against ``PixtralProcessor``, a placeholder without torchvision)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Mistral3ForConditionalGeneration, PreTrainedTokenizerFast

    base = models["base"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base / "tokenizer")
    tokenizer.chat_template = (base / "tokenizer" / "chat_template.jinja").read_text()
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler"),
        vae=AutoencoderKLFlux2.from_pretrained(base, subfolder="vae"),
        text_encoder=Mistral3ForConditionalGeneration.from_pretrained(base / "text_encoder"),
        tokenizer=tokenizer,
        transformer=Flux2Transformer2DModel.from_pretrained(base, subfolder="transformer"))
    if kind == "lora":
        pipe.load_lora_weights(str(models[kind]))
    elif kind == "single_file":
        pipe.transformer = Flux2Transformer2DModel.from_single_file(
            str(models[kind]), config=str(base), subfolder="transformer",
            local_files_only=True)
    elif kind != "base":
        pipe.transformer = Flux2Transformer2DModel.from_pretrained(models[kind] / "transformer")
    return pipe


def _reference_sigmas(pipe, z, t):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    mu = compute_empirical_mu(image_seq_len=z.shape[-2] * z.shape[-1], num_steps=50)
    return pipe.scheduler.time_shift(mu, 1.0, t.float() / 1000)


def _reference_velocity(pipe, z, t, sigma, prompt=PROMPT):
    batch = z.shape[0]
    with torch.no_grad():
        embeds, text_ids = pipe.encode_prompt(prompt, device="cpu")
        guidance = torch.full([1], 4.0, dtype=torch.float32).expand(batch)
        out = pipe.transformer(hidden_states=pipe._pack_latents(z),
                               timestep=(sigma * 1000) / 1000, guidance=guidance,
                               encoder_hidden_states=embeds.expand(batch, -1, -1),
                               txt_ids=text_ids.expand(batch, -1, -1),
                               img_ids=pipe._prepare_latent_ids(z), return_dict=False)[0]
        return pipe._unpack_latents_with_ids(out, pipe._prepare_latent_ids(z))


def test_detects_dev_apart_from_klein(dev, tmp_path):
    from cgidm_core import families
    from cgidm_core.models.formats import safetensors_keys

    assert pipeline_family(dev["base"]) == FLUX2_DEV_FAMILY
    assert detect_finetuned_kind(dev["transformer"]) == "dreambooth"
    assert detect_finetuned_kind(dev["lora"]) == "lora"
    single = tiny_families.make_flux2_dev_single_file(dev["base"], tmp_path / "f.safetensors")
    keys = safetensors_keys(single)
    assert families.base_file_claim(keys).name == FLUX2_DEV_FAMILY
    assert [f.name for f in families.file_claims(keys, "single_file")] == [FLUX2_DEV_FAMILY]
    klein_keys = [k for k in keys if not k.startswith("guidance_in.")]
    assert families.base_file_claim(klein_keys).name == FLUX2_FAMILY


def test_prompt_tokens_are_the_processors(dev):
    """The processor renders its template (BOS first) and then adds no special tokens; the
    padding is Mistral's (left). The ids are what the template says, token for token."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    from cgidm_core.models.flux2_dev import (
        LoadOptions,
        load_mistral_tokenizer,
        mistral_prompt_tokens,
    )

    tokenizer = load_mistral_tokenizer(dev["base"], LoadOptions(torch.device("cpu"),
                                                                torch.float32, True))
    tokens = mistral_prompt_tokens(tokenizer, PROMPT)
    text = f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{PROMPT}[/INST]"
    expected = tokenizer(text, add_special_tokens=False).input_ids
    ids, mask = tokens.input_ids[0].tolist(), tokens.attention_mask[0].tolist()
    assert len(ids) == 512 and ids[-len(expected):] == expected
    assert ids[:-len(expected)] == [tokenizer.pad_token_id] * (512 - len(expected))
    assert mask == [0] * (512 - len(expected)) + [1] * len(expected)
    assert ids.count(tokenizer.bos_token_id) == 1


def test_a_legacy_chat_template_json_gives_the_same_tokens(dev, tmp_path):
    """Processor folders saved by older transformers hold the template as chat_template.json;
    one without any template is refused by name."""
    import json
    import shutil

    from cgidm_core.errors import ModelFormatError
    from cgidm_core.models.flux2_dev import (
        LoadOptions,
        load_mistral_tokenizer,
        mistral_prompt_tokens,
    )

    opts = LoadOptions(torch.device("cpu"), torch.float32, True)
    folder = tmp_path / "legacy"
    shutil.copytree(dev["base"] / "tokenizer", folder / "tokenizer")
    template = folder / "tokenizer" / "chat_template.jinja"
    (folder / "tokenizer" / "chat_template.json").write_text(
        json.dumps({"chat_template": template.read_text()}))
    template.unlink()
    ours = mistral_prompt_tokens(load_mistral_tokenizer(folder, opts), PROMPT)
    theirs = mistral_prompt_tokens(load_mistral_tokenizer(dev["base"], opts), PROMPT)
    assert ours.input_ids.tolist() == theirs.input_ids.tolist()
    (folder / "tokenizer" / "chat_template.json").unlink()
    with pytest.raises(ModelFormatError, match="no chat template"):
        load_mistral_tokenizer(folder, opts)


#: The quick suite runs the LoRA layout; the pipeline folder and the single file run with the slow
#: tests. A ``transformer/`` folder goes through the same transformer_adapter code as Klein's
#: (tested in test_flux2.py), so it is not run again here.
@pytest.mark.parametrize("kind", [pytest.param("pipeline", marks=pytest.mark.slow),
                                  pytest.param("single_file", marks=pytest.mark.slow), "lora"])
def test_layouts_predict_like_diffusers(dev, kind, tmp_path):
    from cgidm_core.models.flux2_dev import Flux2DevLoraPair, Flux2DevPair

    models = dict(dev)
    if kind == "single_file":
        models[kind] = tiny_families.make_flux2_dev_single_file(dev["base"],
                                                                tmp_path / "ft.safetensors")
    elif kind == "pipeline":
        models[kind] = tiny_families.make_full_finetune("Flux2Transformer2DModel", dev["base"],
                                                        tmp_path / "ft", seed=7)
    pair = load_pair_from_paths(models["base"], models[kind], **CPU)
    assert type(pair) is (Flux2DevLoraPair if kind == "lora" else Flux2DevPair)
    assert pair.latent_shape == (16, 8, 8) and pair.image_size == 32
    z = torch.randn((2, *pair.latent_shape), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([20, 700])
    cond = pair.conditioning(PROMPT)
    with torch.no_grad():
        v_ft, v_pre = pair.eps_finetuned(z, t, cond), pair.eps_pretrained(z, t, cond)
    base = _reference_pipeline(models, "base")
    sigma = pair.sigmas(t, z)
    torch.testing.assert_close(sigma, _reference_sigmas(base, z, t), rtol=0, atol=1e-7)
    torch.testing.assert_close(v_pre, _reference_velocity(base, z, t, sigma))
    torch.testing.assert_close(v_ft, _reference_velocity(_reference_pipeline(models, kind), z,
                                                         t, sigma))
    assert (v_ft - v_pre).abs().max() > 1e-3
    if kind == "lora":  # one transformer: the adapter switched on and off, no copy
        assert pair.unet_finetuned is pair.unet_pretrained and len(pair.unet_adapter) > 0
        with torch.no_grad():
            again = pair.eps_pretrained(z, t, cond)
        torch.testing.assert_close(again, v_pre, rtol=0, atol=0)


@pytest.mark.slow
def test_trainer_loras_predict_like_the_same_diffusers_lora(dev, tmp_path):
    """ai-toolkit's BFL-named LoRA (``diffusion_model.double_blocks.N.img_attn.qkv``, one down
    matrix for q, k, v) and musubi-tuner / sd-scripts' (``lora_unet_double_blocks_*`` with
    ``alpha``) through cgidm's loader give the velocity Flux2Pipeline gives with the diffusers
    LoRA of the same weights."""
    from cgidm_core.models.flux2_dev import Flux2DevLoraPair

    toolkit, diffusers_lora = tiny_families.make_flux2_lora_pair(
        "Flux2Pipeline", dev["base"], tmp_path, seed=9)
    z = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([20, 700])
    reference = _reference_pipeline({**dev, "lora": diffusers_lora}, "lora")
    expected = None
    for lora in (toolkit, toolkit.parent / "kohya.safetensors"):
        assert detect_finetuned_kind(lora) == "lora"
        pair = load_pair_from_paths(dev["base"], lora, **CPU)
        assert type(pair) is Flux2DevLoraPair
        cond = pair.conditioning(PROMPT)
        with torch.no_grad():
            v_ft, v_pre = pair.eps_finetuned(z, t, cond), pair.eps_pretrained(z, t, cond)
        if expected is None:
            expected = _reference_velocity(reference, z, t, pair.sigmas(t, z))
        torch.testing.assert_close(v_ft, expected)
        assert (v_ft - v_pre).abs().max() > 1e-3
