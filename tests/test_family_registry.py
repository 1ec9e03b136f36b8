"""The family registry (cgidm_core/families.py): every entry complete, every existing family's
layouts recognised by the table alone, and `cgidm models --families` printing it.

Detection reads only JSON configs and safetensors headers, so the layouts here are configs and
one-element tensors named as each family's files name them: no model is built.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cgidm.cli import main
from cgidm.model_files import UPLOAD_KINDS, ModelFileError, classify
from cgidm_core import families
from cgidm_core.demo import demo_model_path
from cgidm_core.errors import (
    IncompatiblePairError,
    ModelFormatError,
    UnsupportedModelFamilyError,
)
from cgidm_core.models.flow import FlowMatchingPair
from cgidm_core.models.formats import (
    base_file_family,
    check_finetune_family,
    detect_finetuned_kind,
    finetune_claims,
    pipeline_entry,
)
from cgidm_core.names import DEMO_BASES, DEMO_FAMILIES, FINETUNED_KINDS
from tests.paths import REPO_ROOT

SD, SDXL, FLUX, DDPM, FLOW = ("stable-diffusion", "stable-diffusion-xl", "flux", "ddpm",
                              "pixel-flow")
SD3, CHROMA, ZIMAGE, QWEN, FLUX2 = "sd3", "chroma", "z-image", "qwen-image", "flux2"
FLUX2_DEV = "flux2-dev"

# -- tensor names as each family's trainers and converters write them -------------------------

SD_LORA = ["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight",
           "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
SDXL_LORA = ["lora_unet_input_blocks_4_1_proj_in.lora_down.weight",
             "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
FLUX_LORA = ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
             "lora_unet_double_blocks_0_img_attn_qkv.alpha"]
SD_FILE = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.x",
           "cond_stage_model.transformer.x"]
SDXL_FILE = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.x",
             "conditioner.embedders.0.transformer.x", "conditioner.embedders.1.model.x"]
FLUX_FILE = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]
SD_UNET = ["conv_in.weight", "time_embedding.linear_1.weight",
           "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
SDXL_UNET = [*SD_UNET, "add_embedding.linear_1.weight"]
#: A pixel UNet2DModel LoRA as cgidm_core.pixel_lora writes it (diffusers and kohya namings).
PIXEL_LORA = ["unet.mid_block.attentions.0.to_q.lora_A.weight",
              "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
PIXEL_UNET = ["conv_in.weight", "time_embedding.linear_1.weight",
              "down_blocks.0.resnets.0.conv1.weight"]
SD3_FILE = ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]
SD3_LORA = ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"]
SD3_KOHYA_LORA = ["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"]
CHROMA_FILE = [*FLUX_FILE, "distilled_guidance_layer.in_proj.weight"]
CHROMA_LORA = ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
ZIMAGE_FILE = ["model.diffusion_model.noise_refiner.0.attention.qkv.weight",
               "model.diffusion_model.context_refiner.0.attention.qkv.weight",
               "model.diffusion_model.cap_embedder.1.weight"]
DIT_COMFY_LORA = ["diffusion_model.layers.0.attention.to_q.lora_A.weight"]
QWEN_COMFY_LORA = ["diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight"]
QWEN_FILE = ["img_in.weight", "txt_norm.weight", "txt_in.weight",
             "transformer_blocks.0.attn.to_q.weight"]
FLUX2_FILE = ["double_stream_modulation_img.linear.weight", "single_stream_modulation.lin.weight"]
FLUX2_LORA = ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
FLUX2_DEV_FILE = ["double_blocks.0.img_attn.qkv.weight", "double_stream_modulation_img.lin.weight",
                  "single_stream_modulation.lin.weight", "guidance_in.in_layer.weight"]
#: HiDream-I1 (refused by name): ComfyUI's single file, diffusers' and ComfyUI's LoRA names.
HIDREAM_FILE = ["model.diffusion_model.double_stream_blocks.0.block.attn1.to_q.weight",
                "model.diffusion_model.single_stream_blocks.0.block.attn1.to_q.weight",
                "model.diffusion_model.caption_projection.0.linear.weight"]
HIDREAM_LORAS = [
    ["transformer.double_stream_blocks.0.block.attn1.to_q.lora_A.weight"],
    ["diffusion_model.single_stream_blocks.0.block.attn1.to_q.lora_A.weight"],
    ["lora_unet_double_stream_blocks_0_block_attn1_to_q.lora_down.weight"],
]

#: (family, layout, tensor names): each family's files, as the table must recognise them.
FILES = [
    (SD, "lora", SD_LORA), (SD, "single_file", SD_FILE), (SD, "unet", SD_UNET),
    (SDXL, "lora", SDXL_LORA), (SDXL, "single_file", SDXL_FILE), (SDXL, "unet", SDXL_UNET),
    (FLUX, "lora", FLUX_LORA), (FLUX, "single_file", FLUX_FILE),
    (DDPM, "unet", PIXEL_UNET), (FLOW, "unet", PIXEL_UNET), (DDPM, "lora", PIXEL_LORA),
    (FLOW, "lora", PIXEL_LORA),
    (SD3, "lora", SD3_LORA), (SD3, "lora", SD3_KOHYA_LORA), (SD3, "single_file", SD3_FILE),
    (CHROMA, "lora", CHROMA_LORA), (CHROMA, "lora", FLUX_LORA),
    (CHROMA, "single_file", CHROMA_FILE),
    (ZIMAGE, "lora", DIT_COMFY_LORA), (ZIMAGE, "single_file", ZIMAGE_FILE),
    (QWEN, "lora", QWEN_COMFY_LORA), (QWEN, "single_file", QWEN_FILE),
    (FLUX2, "lora", FLUX2_LORA), (FLUX2, "single_file", FLUX2_FILE),
    (FLUX2_DEV, "lora", FLUX2_LORA), (FLUX2_DEV, "single_file", FLUX2_DEV_FILE),
]

#: Pretrained single files: (family, tensor names); the transformer families' hold the
#: denoiser alone.
BASE_FILES = [(SD, SD_FILE), (SDXL, SDXL_FILE), (FLUX, FLUX_FILE), (SD3, SD3_FILE),
              (CHROMA, CHROMA_FILE), (ZIMAGE, ZIMAGE_FILE), (QWEN, QWEN_FILE),
              (FLUX2, FLUX2_FILE), (FLUX2_DEV, FLUX2_DEV_FILE)]

#: The new transformer families' pipeline folders: (class, parts, transformer class).
_TRANSFORMER_PIPELINES = {
    SD3: ("StableDiffusion3Pipeline", ("transformer", "vae", "text_encoder", "text_encoder_2",
                                       "text_encoder_3", "tokenizer", "tokenizer_2",
                                       "tokenizer_3", "scheduler"), "SD3Transformer2DModel"),
    CHROMA: ("ChromaPipeline", ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
             "ChromaTransformer2DModel"),
    ZIMAGE: ("ZImagePipeline", ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
             "ZImageTransformer2DModel"),
    QWEN: ("QwenImagePipeline", ("transformer", "vae", "text_encoder", "tokenizer",
                                 "scheduler"), "QwenImageTransformer2DModel"),
    FLUX2: ("Flux2KleinPipeline", ("transformer", "vae", "text_encoder", "tokenizer",
                                   "scheduler"), "Flux2Transformer2DModel"),
    FLUX2_DEV: ("Flux2Pipeline", ("transformer", "vae", "text_encoder", "tokenizer",
                                  "scheduler"), "Flux2Transformer2DModel"),
}


def _file(folder: Path, name: str, keys: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({key: torch.zeros(1) for key in keys}, str(path))
    return path


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _pipeline(root: Path, family: str) -> Path:
    """A pipeline folder of ``family`` as diffusers saves it, configs only."""
    part = ["diffusers", "x"]
    folder = root / family
    if family in (DDPM, FLOW):
        scheduler = "FlowMatchEulerDiscreteScheduler" if family == FLOW else "DDPMScheduler"
        _write(folder / "model_index.json", {"_class_name": "DDPMPipeline", "unet": part,
                                             "scheduler": part})
        _write(folder / "scheduler" / "scheduler_config.json", {"_class_name": scheduler})
        _write(folder / "unet" / "config.json", {"_class_name": "UNet2DModel"})
        return folder
    if family in _TRANSFORMER_PIPELINES:
        name, parts, transformer = _TRANSFORMER_PIPELINES[family]
        _write(folder / "model_index.json", {"_class_name": name, **dict.fromkeys(parts, part)})
        _write(folder / "transformer" / "config.json", {"_class_name": transformer})
        return folder
    if family == FLUX:
        parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                 "tokenizer_2", "scheduler")
        _write(folder / "model_index.json", {"_class_name": "FluxPipeline",
                                             **dict.fromkeys(parts, part)})
        _write(folder / "transformer" / "config.json",
               {"_class_name": "FluxTransformer2DModel", "in_channels": 64})
        _write(folder / "vae" / "config.json", {"latent_channels": 16})
        return folder
    parts = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    unet = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "cross_attention_dim": 32}
    name = "StableDiffusionPipeline"
    if family == SDXL:
        parts += ["text_encoder_2", "tokenizer_2"]
        unet.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=6 * 8 + 64, cross_attention_dim=96)
        name = "StableDiffusionXLPipeline"
    _write(folder / "model_index.json", {"_class_name": name, **dict.fromkeys(parts, part)})
    _write(folder / "unet" / "config.json", unet)
    return folder


# -- every entry complete ---------------------------------------------------------------------


@pytest.mark.parametrize("family", families.FAMILIES, ids=lambda f: f.name)
def test_every_entry_is_complete_and_points_at_a_working_adapter(family):
    assert family.name and family.title and family.summary
    assert families.get(family.name) is family
    assert family.objective in ("noise", "flow")
    assert family.conditioning in ("text", "none")
    assert family.space in ("latent", "pixel")
    assert set(family.finetuned_layouts) <= set(FINETUNED_KINDS)
    assert set(family.upload_kinds) <= set(UPLOAD_KINDS) & set(family.finetuned_layouts)
    assert family.pretrained_layouts
    assert bool(family.lora_formats) == ("lora" in family.finetuned_layouts)
    adapter = families.adapter(family)
    assert callable(adapter.check_pipeline_folder) and callable(adapter.load_pair)
    rule = family.recognition
    assert rule.pipeline_classes and rule.denoiser_classes
    if rule.base_file is not None:
        assert rule.base_file_layout in ("complete", "denoiser")
        if rule.base_file_layout == "complete":
            assert callable(adapter.convert_single_file_base)
    for dotted in family.pair_classes:
        module, name = dotted.rsplit(".", 1)
        pair_class = getattr(importlib.import_module(module), name)
        assert pair_class.family == family.name
        assert issubclass(pair_class, FlowMatchingPair) == (family.objective == "flow")
    assert getattr(torch, family.defaults.gpu_dtype) in (torch.float16, torch.bfloat16)
    assert family.defaults.resolution > 0
    assert bool(family.defaults.prompt_source) == (family.conditioning == "text")
    if family.objective == "flow":
        assert family.defaults.time_shift
    if family.space == "latent":
        memory = family.memory
        assert memory is not None and memory.native_latent_pixels > 0
        sides = {side for side, _ in memory.activation_counts}
        assert len(sides) == 2 and all((side, ckpt) in memory.activation_counts
                                       for side in sides for ckpt in (False, True))


def test_names_are_unique_and_refused_families_are_not_loadable():
    names = [family.name for family in families.FAMILIES]
    assert len(names) == len(set(names))
    for refused in families.REFUSED:
        assert refused.name not in names and refused.message
        assert families.title(refused.name) == refused.title


# -- recognition by the table -----------------------------------------------------------------


@pytest.mark.parametrize("family", [SD, SDXL, FLUX, DDPM, FLOW, *_TRANSFORMER_PIPELINES])
def test_pipeline_folders_are_recognised_by_the_table(tmp_path, family):
    folder = _pipeline(tmp_path, family)
    assert pipeline_entry(folder) is families.get(family)
    if family in _TRANSFORMER_PIPELINES:  # a fine-tuned transformer/ folder of the family
        assert detect_finetuned_kind(folder / "transformer") == "dreambooth"
        claims = finetune_claims("dreambooth", folder / "transformer")
        assert families.get(family) in claims  # Flux.2 dev and Klein share their class
        assert len(claims) == (2 if family in (FLUX2, FLUX2_DEV) else 1)


@pytest.mark.parametrize("family, kind, keys", FILES, ids=[f"{f}-{k}" for f, k, _ in FILES])
def test_finetune_files_are_recognised_by_the_table(tmp_path, family, kind, keys):
    path = _file(tmp_path, kind, keys)
    assert detect_finetuned_kind(path) == kind
    assert families.get(family) in families.file_claims(keys, kind)
    check_finetune_family(families.get(family), kind, path)  # accepted for its own family


@pytest.mark.parametrize("base, kind, keys", [
    (SD, "lora", FLUX_LORA), (SD, "lora", SDXL_LORA), (SD, "single_file", SDXL_FILE),
    (SD, "single_file", FLUX_FILE), (SDXL, "lora", FLUX_LORA), (FLUX, "lora", SD_LORA),
    (FLUX, "single_file", SD_FILE), (FLUX, "unet", SD_UNET), (DDPM, "lora", SD_LORA),
    (SD, "ddpm", None), (FLUX, "single_file", CHROMA_FILE), (CHROMA, "single_file", FLUX_FILE),
    (FLUX, "single_file", SD3_FILE), (SD3, "single_file", ZIMAGE_FILE),
    (ZIMAGE, "single_file", QWEN_FILE), (QWEN, "lora", SD3_KOHYA_LORA),
    (FLUX, "lora", SD3_LORA), (SD, "single_file", ZIMAGE_FILE), (SDXL, "single_file", QWEN_FILE),
    (FLUX2, "lora", DIT_COMFY_LORA), (SD3, "lora", DIT_COMFY_LORA),
])
def test_files_of_another_family_are_refused_before_loading(tmp_path, base, kind, keys):
    path = _pipeline(tmp_path, DDPM) if keys is None else _file(tmp_path, "ft", keys)
    with pytest.raises(IncompatiblePairError, match="same family|compare it with the base"):
        check_finetune_family(families.get(base), kind, path)


@pytest.mark.parametrize("family, keys", BASE_FILES, ids=[f for f, _ in BASE_FILES])
def test_pretrained_single_files_are_recognised_by_the_table(tmp_path, family, keys):
    found = base_file_family(_file(tmp_path, "base", keys))
    assert found is families.get(family)
    expected = "complete" if family in (SD, SDXL) else "denoiser"
    assert found.recognition.base_file_layout == expected


def test_a_recognised_layout_the_family_does_not_load_is_refused_by_name(tmp_path, monkeypatch):
    """No registered family recognises a layout it does not load today (Klein's single files
    were the last); the refusal stays for the next family, so it is run on a Klein entry
    without its single-file layout."""
    import dataclasses

    path = _file(tmp_path, "flux2", FLUX2_FILE)
    assert detect_finetuned_kind(path) == "single_file"
    check_finetune_family(families.get(FLUX2), "single_file", path)  # loaded since #23
    klein = dataclasses.replace(families.get(FLUX2), finetuned_layouts=("pipeline", "lora"))
    monkeypatch.setattr(families, "FAMILIES", tuple(
        klein if f.name == FLUX2 else f for f in families.FAMILIES))
    with pytest.raises(ModelFormatError, match="Flux.2 Klein single-file.*does not load"):
        check_finetune_family(klein, "single_file", path)


def test_refused_variants_and_unknown_families_are_refused_by_name(tmp_path):
    sd3 = tmp_path / "sd3"  # a variant the family's adapter does not load
    _write(sd3 / "model_index.json", {"_class_name": "StableDiffusion3ControlNetPipeline"})
    with pytest.raises(UnsupportedModelFamilyError, match="text-to-image StableDiffusion3"):
        pipeline_entry(sd3)
    klein = tmp_path / "klein-kv"  # Flux2* but neither dev nor Klein text-to-image
    _write(klein / "model_index.json", {"_class_name": "Flux2KleinKVPipeline"})
    with pytest.raises(UnsupportedModelFamilyError, match="Flux2KleinPipeline"):
        pipeline_entry(klein)
    other = tmp_path / "other"
    _write(other / "model_index.json", {"_class_name": "KandinskyPipeline"})
    with pytest.raises(UnsupportedModelFamilyError, match="KandinskyPipeline.*models --families"):
        pipeline_entry(other)


def test_the_demo_models_are_recognised_as_their_registered_family():
    for name, base in DEMO_BASES.items():
        if base is None:
            assert pipeline_entry(demo_model_path(name)).name == DEMO_FAMILIES[name]
        else:
            family = families.get(DEMO_FAMILIES[base])
            kind = detect_finetuned_kind(demo_model_path(name))
            assert kind in family.finetuned_layouts
            check_finetune_family(family, kind, demo_model_path(name))


def test_upload_check_reads_the_table():
    assert classify(SD_LORA, SD) == "lora"
    assert classify(PIXEL_UNET, DDPM) == "unet"
    for keys in (FLUX_LORA, SDXL_LORA, SD3_FILE, CHROMA_FILE, ZIMAGE_FILE, QWEN_FILE,
                 FLUX2_FILE):  # families that take uploads, but not for an SD base
        with pytest.raises(ModelFileError) as err:
            classify(keys, SD)
        assert err.value.code == "family_mismatch"
    for keys in (FLUX_FILE, FLUX2_DEV_FILE):  # Flux.1 and Flux.2 dev take no uploads yet
        with pytest.raises(ModelFileError) as err:
            classify(keys, SD)
        assert err.value.code == "unsupported_family"
    with pytest.raises(ModelFileError) as err:  # a base of a family that takes no uploads
        classify(SD_LORA, FLUX)
    assert err.value.code == "unsupported_family"
    with pytest.raises(ModelFileError) as err:  # the pixel flow base takes pixel LoRAs only
        classify(SD_LORA, FLOW)
    assert err.value.code == "family_mismatch"


def test_the_gpu_dtype_when_the_caller_says_auto_is_the_familys():
    from cgidm_core.models.loading import _default_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _default_dtype(families.get(FLUX), None, cuda) == "bfloat16"
    assert _default_dtype(families.get(FLUX), "auto", cuda) == "bfloat16"
    assert _default_dtype(families.get(SD), None, cuda) == "float16"
    for name in (SD3, CHROMA, ZIMAGE, QWEN, FLUX2, FLUX2_DEV):  # released in bfloat16
        assert _default_dtype(families.get(name), None, cuda) == "bfloat16"
    assert _default_dtype(families.get(FLUX), None, cpu) is None  # float32 on a CPU
    assert _default_dtype(families.get(FLUX), "float16", cuda) == "float16"  # the caller's


# -- what users and the docs read -------------------------------------------------------------


def test_cgidm_models_families_prints_the_table(capsys):
    assert main(["models", "--families"]) == 0
    text = capsys.readouterr().out
    for family in families.FAMILIES:
        assert f"{family.name}  {family.title}" in text
        assert family.adapter in text
    assert "Adding a family" in text
    assert main(["models", "--families", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == [family.name for family in families.FAMILIES]
    assert rows == families.describe()


def test_families_doc_lists_every_registered_family_and_adapter():
    text = (REPO_ROOT / "docs" / "FAMILIES.md").read_text(encoding="utf-8")
    for family in families.FAMILIES:
        assert f"`{family.name}`" in text and f"`{family.adapter}`" in text


def test_the_service_registry_accepts_only_registered_families(tmp_path):
    from cgidm.registry import RegistryError, load_registry

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"models": [{"id": "b", "family": SDXL, "path": "x"}]}))
    assert load_registry(good).get("b").family == SDXL
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"models": [{"id": "b", "family": "sdxl", "path": "x"}]}))
    with pytest.raises(RegistryError, match="unknown model family 'sdxl'.*stable-diffusion-xl"):
        load_registry(typo)


def test_hidream_is_refused_by_name_in_every_layout(tmp_path):
    """HiDream-I1 (four text encoders incl. Llama-3.1-8B; docs/FAMILIES.md says why) is told
    apart by its pipeline class, transformer class, single-file and LoRA names, and refused
    with a message naming it, what makes it heavy and what to do."""
    why = "HiDream-I1 is not supported: .*Llama-3.1-8B.*`cgidm models --families`"
    pipe = tmp_path / "hidream"
    _write(pipe / "model_index.json", {"_class_name": "HiDreamImagePipeline"})
    with pytest.raises(UnsupportedModelFamilyError, match=why):
        pipeline_entry(pipe)
    _write(tmp_path / "db" / "transformer" / "config.json",
           {"_class_name": "HiDreamImageTransformer2DModel"})
    with pytest.raises(UnsupportedModelFamilyError, match=why):
        detect_finetuned_kind(tmp_path / "db")
    single = _file(tmp_path, "hidream_i1_full", HIDREAM_FILE)
    for check in (detect_finetuned_kind, base_file_family):
        with pytest.raises(UnsupportedModelFamilyError, match=why):
            check(single)
    with pytest.raises(ModelFileError, match="HiDream-I1") as err:
        classify(HIDREAM_FILE, SD)
    assert err.value.code == "unsupported_family"
    for i, keys in enumerate(HIDREAM_LORAS):  # claimed by Z-Image / Flux.2 names, refused first
        lora = _file(tmp_path / f"lora{i}", "lora", keys)
        assert detect_finetuned_kind(lora) == "lora"
        for base in (ZIMAGE, FLUX2, SD):
            with pytest.raises(UnsupportedModelFamilyError, match=why):
                check_finetune_family(families.get(base), "lora", lora)
    for _, _, keys in FILES:  # no registered family's file is taken for HiDream's
        assert families.refused_lora(keys) is None and families.refused_file(keys) is None
