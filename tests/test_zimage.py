"""Z-Image: every layout predicts the velocity diffusers' own ZImagePipeline computes.

References come from ``ZImagePipeline`` itself (``encode_prompt``: the chat template, Qwen3's
second-to-last hidden states of the prompt's tokens; the transformer called on lists at
``(1000 - t) / 1000`` with its output negated, as the denoising loop does; ``load_lora_weights``
with diffusers' Z-Image converter), on tiny random models with a locally built tokenizer, CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel

from cgidm_core.errors import IncompatiblePairError
from cgidm_core.models import detect_finetuned_kind, load_pair_from_paths
from cgidm_core.models.formats import pipeline_family
from cgidm_core.models.zimage import ZImageLoraPair, ZImagePair
from cgidm_core.names import ZIMAGE_FAMILY
from cgidm_testkit import tiny_families

PROMPT = "sks style"
CPU = {"device": "cpu"}
LORAS = ("lora", "comfy_lora")


@pytest.fixture(scope="module")
def zimage(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zimage")
    base = tiny_families.make_tiny_zimage(root / "base")
    return {
        "base": base,
        "pipeline": tiny_families.make_zimage_full_finetune(base, root / "full", seed=2),
        "transformer": tiny_families.make_zimage_transformer_folder(base, root / "db", seed=3),
        "single_file": tiny_families.make_zimage_single_file(base, root / "ft.safetensors",
                                                             seed=4),
        "lora": tiny_families.make_zimage_lora(base, root / "lora", seed=5),
        "comfy_lora": tiny_families.make_zimage_lora(
            base, root / "comfy" / "zimage_style.safetensors", seed=6, naming="comfy",
            metadata={"ss_output_name": "zimage_style",
                      "ss_tag_frequency": json.dumps({"1_sks style": {"sks style": 8}})}),
    }


def _reference_pipeline(models: dict[str, Path], kind: str) -> ZImagePipeline:
    pipe = ZImagePipeline.from_pretrained(models["base"], local_files_only=True)
    if kind in LORAS:
        lora = models[kind]
        pipe.load_lora_weights(str(lora.parent if lora.is_file() else lora),
                               **({"weight_name": lora.name} if lora.is_file() else {}))
    elif kind != "base":
        folder = models[kind]
        if kind == "single_file":
            folder = folder.parent / f"{folder.stem}_diffusers"
        pipe.transformer = ZImageTransformer2DModel.from_pretrained(folder / "transformer")
    return pipe


def _reference_velocity(pipe: ZImagePipeline, z, t, prompt=PROMPT):
    shift = pipe.scheduler.config.shift
    s = t.float() / 1000
    timesteps = shift * s / (1 + (shift - 1) * s) * 1000  # the scheduler's timesteps
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        out = pipe.transformer(list(z.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000,
                               embeds * len(z), return_dict=False)[0]
    return -torch.stack([o.float() for o in out]).squeeze(2)


def _inputs(shape, batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=generator), torch.tensor([20, 700][:batch])


def test_detects_zimage_and_every_layout(zimage):
    assert pipeline_family(zimage["base"]) == ZIMAGE_FAMILY
    expected = {"pipeline": "pipeline", "transformer": "dreambooth",
                "single_file": "single_file", "lora": "lora", "comfy_lora": "lora"}
    assert {k: detect_finetuned_kind(zimage[k]) for k in expected} == expected


#: The quick suite runs the ComfyUI-named LoRA (converted by diffusers, trigger from metadata);
#: the rest is slow.
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) for k in
                                  ("pipeline", "transformer", "single_file", "lora")]
                         + ["comfy_lora"])
def test_layouts_predict_like_diffusers(zimage, kind):
    pair = load_pair_from_paths(zimage["base"], zimage[kind], **CPU)
    assert type(pair) is (ZImageLoraPair if kind in LORAS else ZImagePair)
    assert pair.family == ZIMAGE_FAMILY and pair.latent_shape == (16, 16, 16)
    z, t = _inputs(pair.latent_shape)
    cond = pair.conditioning(PROMPT)
    with torch.no_grad():
        v_ft, v_pre = pair.eps_finetuned(z, t, cond), pair.eps_pretrained(z, t, cond)
    torch.testing.assert_close(v_pre, _reference_velocity(_reference_pipeline(zimage, "base"),
                                                          z, t))
    torch.testing.assert_close(v_ft, _reference_velocity(_reference_pipeline(zimage, kind), z, t))
    assert (v_ft - v_pre).abs().max() > 1e-3
    if kind in LORAS:
        assert pair.unet_finetuned is pair.unet_pretrained and len(pair.unet_adapter) > 0
    if kind == "comfy_lora":  # the trigger from the file's kohya-style metadata
        assert (pair.default_prompt, pair.default_prompt_source) == ("sks style",
                                                                     "safetensors_metadata")


@pytest.mark.slow
def test_zimage_files_on_another_base_are_refused(zimage, tmp_path):
    chroma = tiny_families.make_tiny_chroma(tmp_path / "chroma")
    with pytest.raises(IncompatiblePairError, match="is a Z-Image (single-file|fine-tuned)"):
        load_pair_from_paths(chroma, zimage["single_file"], **CPU)
    with pytest.raises(IncompatiblePairError):
        load_pair_from_paths(chroma, zimage["lora"], **CPU)


def test_the_registry_interface_loads_the_same_pair(zimage):
    """``check_pipeline_folder`` / ``load_pair(PairRequest)``: the shape of the family registry's
    adapter interface (issue #23), which every new adapter module provides."""
    from types import SimpleNamespace

    from cgidm_core.models import zimage as adapter
    from cgidm_core.models.sd_loading import LoadOptions

    adapter.check_pipeline_folder(zimage["base"],
                                  json.loads((zimage["base"] / "model_index.json").read_text()))
    opts = LoadOptions(device=torch.device("cpu"), dtype=torch.float32, local_files_only=True)
    request = SimpleNamespace(pretrained=zimage["base"], finetuned=zimage["transformer"],
                              kind="dreambooth", opts=opts, keep_text_encoders=False,
                              pretrained_file=None)
    pair = adapter.load_pair(request)
    assert type(pair) is ZImagePair and pair.finetuned_kind == "dreambooth"
