"""Uploads of the newer families through the gateway's route (in-process, TestClient).

A LoRA or single file of each family that takes uploads (``upload_kinds`` in its registry entry:
SD 3.5, SDXL with its v-prediction / zero-terminal-SNR descendants, Chroma, Z-Image, Qwen-Image,
Flux.2 Klein) is accepted against a registered base of its family and refused with a 422
``family_mismatch`` against a base of each other family (a layout its family does not load as
an upload, a 422 ``unsupported_upload_kind``, is tested in test_model_files.py). The files are
real safetensors files with tiny tensors and the tensor names of each family's released
architecture, in the namings its trainers write (diffusers' DreamBooth-LoRA scripts' default
target modules, ComfyUI / ai-toolkit, kohya-ss, Stability / BFL / ComfyUI single files), with
the real block counts: which family a file belongs to is read from the family registry's key
signatures (``cgidm_core/key_signatures.py``), as the gateway reads it.

The names that CANNOT tell two families apart are pinned in :data:`SHARED_NAMES` (a Chroma
LoRA is a Flux.1 LoRA by its names; Flux.1 bases take no uploads).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from cgidm.model_files import classify
from cgidm_core import families
from tests.service.inprocess import gateway_in_process

#: registry id of each base -> its family.
BASES = {"sd3-base": "sd3", "chroma-base": "chroma", "zimage-base": "z-image",
         "qwen-base": "qwen-image", "flux2-base": "flux2", "sdxl-base": "stable-diffusion-xl",
         "noobai-vpred": "stable-diffusion-xl", "sd-base": "stable-diffusion"}
NEW_FAMILY_BASES = {"sd3-base", "chroma-base", "zimage-base", "qwen-base", "flux2-base",
                    "sdxl-base"}

_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_JOINT = (*_ATTN, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def _lora(modules: list[str], prefix: str = "transformer.") -> list[str]:
    return [f"{prefix}{m}.{ab}.weight" for m in modules for ab in ("lora_A", "lora_B")]


def sd35_large_lora() -> list[str]:
    """train_dreambooth_lora_sd3.py's default targets on 38 joint blocks (the last one, context
    pre-only, has no ``to_add_out``)."""
    return _lora([f"transformer_blocks.{b}.attn.{p}" for b in range(38) for p in _JOINT
                  if not (b == 37 and p == "to_add_out")])


def sd35_medium_lora() -> list[str]:
    """The same on SD 3.5 medium's 24 blocks, with the second attention of its first 13."""
    return _lora([f"transformer_blocks.{b}.attn.{p}" for b in range(24) for p in _JOINT
                  if not (b == 23 and p == "to_add_out")]
                 + [f"transformer_blocks.{b}.attn2.{p}" for b in range(13) for p in _ATTN])


def chroma_lora() -> list[str]:
    return _lora([f"transformer_blocks.{b}.attn.{p}" for b in range(19) for p in _JOINT]
                 + [f"single_transformer_blocks.{b}.{p}" for b in range(38)
                    for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")])


def zimage_lora(prefix: str = "transformer.") -> list[str]:
    """diffusers' naming, or ComfyUI's (``diffusion_model.``, fused ``qkv`` and ``out``)."""
    attention = _ATTN if prefix == "transformer." else ("qkv", "out")
    return _lora([f"layers.{b}.attention.{p}" for b in range(30) for p in attention], prefix)


def qwen_image_lora(prefix: str = "transformer.") -> list[str]:
    """train_dreambooth_lora_qwen_image.py's default targets on all 60 blocks (ai-toolkit's
    ``diffusion_model.`` files name the same modules)."""
    return _lora([f"transformer_blocks.{b}.attn.{p}" for b in range(60) for p in _ATTN],
                 prefix)


def flux2_klein_lora() -> list[str]:
    """Klein 4B's 5 double-stream and 20 single-stream blocks (fused ``to_qkv_mlp_proj``)."""
    return _lora([f"transformer_blocks.{b}.{p}" for b in range(5)
                  for p in (*(f"attn.{a}" for a in _JOINT), "ff.linear_in", "ff.linear_out")]
                 + [f"single_transformer_blocks.{b}.attn.{p}" for b in range(20)
                    for p in ("to_qkv_mlp_proj", "to_out")])


def sdxl_kohya_lora() -> list[str]:
    return [f"lora_{m}.{p}" for m in ("unet_input_blocks_4_1_proj_in",
                                      "te1_text_model_encoder_layers_0_mlp_fc1",
                                      "te2_text_model_encoder_layers_0_mlp_fc1")
            for p in ("lora_down.weight", "lora_up.weight", "alpha")]


def sdxl_vpred_single_file() -> list[str]:
    """A NoobAI-XL v-pred style SGM checkpoint, with its ``v_pred`` / ``ztsnr`` markers."""
    return ["v_pred", "ztsnr", "model.diffusion_model.input_blocks.0.0.weight",
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
            "conditioner.embedders.1.model.token_embedding.weight",
            "first_stage_model.encoder.conv_in.weight"]


def sd3_single_file() -> list[str]:
    """Stability's naming of an SD 3.5 transformer."""
    return [f"model.diffusion_model.{k}" for k in (
        "x_embedder.proj.weight", "pos_embed", "context_embedder.weight",
        "joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.context_block.attn.qkv.weight")]


def chroma_single_file() -> list[str]:
    return ["distilled_guidance_layer.in_proj.weight", "double_blocks.0.img_attn.qkv.weight",
            "single_blocks.0.linear1.weight", "img_in.weight", "txt_in.weight"]


def zimage_single_file() -> list[str]:
    """ComfyUI's naming of a Z-Image transformer."""
    return [f"model.diffusion_model.{k}" for k in (
        "noise_refiner.0.attention.qkv.weight", "context_refiner.0.attention.qkv.weight",
        "cap_embedder.1.weight", "layers.0.attention.qkv.weight", "x_embedder.weight")]


def qwen_image_single_file() -> list[str]:
    return ["txt_norm.weight", "img_in.weight", "txt_in.weight",
            "transformer_blocks.0.attn.to_q.weight",
            "transformer_blocks.0.img_mlp.net.0.proj.weight"]


def flux2_single_file() -> list[str]:
    """``flux-2-klein-4b.safetensors``: BFL naming, 5 double-stream and 20 single-stream
    blocks, no ``guidance_in.*`` (dev's guidance embedding)."""
    double = [f"{s}_{m}" for s in ("img", "txt") for m in (
        "attn.qkv", "attn.proj", "attn.norm.query_norm", "attn.norm.key_norm", "mlp.0", "mlp.2")]
    single = ("linear1", "linear2", "norm.query_norm", "norm.key_norm")
    return ["img_in.weight", "txt_in.weight", "time_in.in_layer.weight",
            "time_in.out_layer.weight", "double_stream_modulation_img.lin.weight",
            "double_stream_modulation_txt.lin.weight", "single_stream_modulation.lin.weight",
            "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight",
            *(f"double_blocks.{b}.{m}.{'scale' if 'norm' in m else 'weight'}"
              for b in range(5) for m in double),
            *(f"single_blocks.{b}.{m}.{'scale' if 'norm' in m else 'weight'}"
              for b in range(20) for m in single)]


#: file -> (its names, the base it belongs to, its kind)
FILES = {
    "sd35-large-lora": (sd35_large_lora, "sd3-base", "lora"),
    "sd35-medium-lora": (sd35_medium_lora, "sd3-base", "lora"),
    "sd3-single-file": (sd3_single_file, "sd3-base", "single_file"),
    "chroma-lora": (chroma_lora, "chroma-base", "lora"),
    "chroma-single-file": (chroma_single_file, "chroma-base", "single_file"),
    "zimage-lora": (zimage_lora, "zimage-base", "lora"),
    "zimage-comfy-lora": (lambda: zimage_lora("diffusion_model."), "zimage-base", "lora"),
    "zimage-single-file": (zimage_single_file, "zimage-base", "single_file"),
    "qwen-lora": (qwen_image_lora, "qwen-base", "lora"),
    "qwen-aitoolkit-lora": (lambda: qwen_image_lora("diffusion_model."), "qwen-base", "lora"),
    "qwen-single-file": (qwen_image_single_file, "qwen-base", "single_file"),
    "flux2-klein-lora": (flux2_klein_lora, "flux2-base", "lora"),
    "flux2-klein-single-file": (flux2_single_file, "flux2-base", "single_file"),
    "sdxl-kohya-lora": (sdxl_kohya_lora, "sdxl-base", "lora"),
    "sdxl-vpred-single-file": (sdxl_vpred_single_file, "noobai-vpred", "single_file"),
}
#: (file, base of another family) whose names cannot tell the two apart, so the gateway takes
#: it (the worker's load then checks the layers against the base).
SHARED_NAMES: set[tuple[str, str]] = set()


def _bytes(names: list[str], metadata: dict[str, str] | None = None) -> bytes:
    tensors = {name: np.zeros((1,) if name in ("v_pred", "ztsnr") or name.endswith(".alpha")
                              else (1, 2), dtype=np.float32) for name in names}
    return save(tensors, metadata={"ss_output_name": "sks style", **(metadata or {})})


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[object]:
    root: Path = tmp_path_factory.mktemp("family_uploads")
    registry = root / "models.json"
    registry.write_text(json.dumps({"models": [
        {"id": base, "family": family, "path": str(root / base)}
        for base, family in BASES.items()]}))
    with gateway_in_process(root / "data", registry, max_model_bytes=10**6) as http:
        yield http


def _post(http, name: str, base: str, kind: str | None = None):
    names, _, _ = FILES[name]
    fields = {"finetuned_from": base, **({"kind": kind} if kind else {})}
    return http.post("/models", data=fields,
                     files={"file": (f"{name}.safetensors", _bytes(names()))})


@pytest.mark.parametrize("name", sorted(FILES))
def test_each_file_is_taken_by_its_family_and_refused_by_the_others(gateway, name):
    _, own, kind = FILES[name]
    for base in sorted(NEW_FAMILY_BASES - {own} | {"sd-base"}):
        if BASES[base] == BASES[own] or (name, base) in SHARED_NAMES:
            continue
        refused = _post(gateway, name, base)
        assert refused.status_code == 422, (name, base, refused.text)
        [detail] = refused.json()["detail"]
        assert detail["type"] == "family_mismatch", (name, base, detail)
        assert detail["loc"] == ["body", "file"]
        assert families.get(BASES[base]).title in detail["msg"]
        assert families.title(BASES[own]) in detail["msg"]
    accepted = _post(gateway, name, own)
    assert accepted.status_code == 201, accepted.text
    model = accepted.json()
    assert (model["kind"], model["family"], model["finetuned_from"]) == (kind, BASES[own], own)
    assert model["prompt_source"] == "none" or model["prompt"]


def test_names_that_cannot_tell_two_families_apart_are_the_documented_ones():
    """A Chroma LoRA has Flux.1's module names, so both claim it, and a Flux.2 Klein LoRA is
    named as a Flux.2 dev one (Flux.1 and Flux.2 dev bases take no uploads); an attention-only
    LoRA of SD 3.x's 38 blocks fits Qwen-Image's 60 too. Every other pair of the files above
    is told apart by the names alone."""
    chroma = chroma_lora()
    assert {f.name for f in families.file_claims(chroma, "lora")} == {"flux", "chroma"}
    with pytest.raises(Exception, match="uploads for 'flux' bases are not supported"):
        classify(chroma, "flux")
    attention_only = _lora([f"transformer_blocks.{b}.attn.{p}" for b in range(38)
                            for p in _ATTN])
    assert {f.name for f in families.file_claims(attention_only, "lora")} == {
        "sd3", "qwen-image"}
    for name, (names, own, kind) in FILES.items():
        claims = {f.name for f in families.file_claims(names(), kind)}
        expected = {"chroma-lora": {"flux", "chroma"},  # Flux.2 dev: Klein's module names
                    "flux2-klein-lora": {"flux2", "flux2-dev"}}.get(name, {BASES[own]})
        assert claims == expected, name


def klein_attention_lora() -> list[str]:
    """A Flux.2 Klein 4B LoRA of its 5 double blocks' attention only: named exactly as a Chroma
    (or Flux.1) LoRA of the same layers, and Klein 4B and Chroma are both 3072 wide."""
    return _lora([f"transformer_blocks.{b}.attn.{p}" for b in range(5) for p in _JOINT])


#: What the trainers write into such a file's header (ai-toolkit: ss_base_model_version from
#: its model class; musubi-tuner / sd-scripts: the SAI model spec's architecture + "/lora").
KLEIN_HEADERS = {"ai-toolkit": {"ss_base_model_version": "flux2_klein_4b"},
                 "musubi-tuner": {"modelspec.architecture": "Flux.2-klein-4b/lora"}}


@pytest.mark.parametrize("trainer", sorted(KLEIN_HEADERS))
def test_a_klein_lora_whose_header_says_klein_is_refused_for_a_chroma_base(gateway, trainer):
    names = klein_attention_lora()
    assert {"chroma", "flux2"} <= {f.name for f in families.file_claims(names, "lora")}
    body = _bytes(names, KLEIN_HEADERS[trainer])
    refused = gateway.post("/models", data={"finetuned_from": "chroma-base"},
                           files={"file": ("klein.safetensors", body)})
    assert refused.status_code == 422, refused.text
    [detail] = refused.json()["detail"]
    assert detail["type"] == "family_mismatch" and detail["loc"] == ["body", "file"]
    assert "trained for Flux.2 Klein" in detail["msg"] and "the base is Chroma" in detail["msg"]
    assert repr(next(iter(KLEIN_HEADERS[trainer].values()))) in detail["msg"]
    accepted = gateway.post("/models", data={"finetuned_from": "flux2-base"},
                            files={"file": ("klein.safetensors", body)})
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["family"] == "flux2"


def test_the_same_names_with_a_chroma_header_or_none_are_taken_for_a_chroma_base(gateway):
    """Names alone cannot tell: a header that says Chroma (sd-scripts' modelspec, with
    ``ss_base_model_version`` "flux1", which names Chroma's parent) or no header at all
    (diffusers' save_lora_weights) is taken; the worker's load records which (test_chroma.py)."""
    names = klein_attention_lora()
    for header in ({"modelspec.architecture": "chroma/lora", "ss_base_model_version": "flux1"},
                   {}):
        accepted = gateway.post("/models", data={"finetuned_from": "chroma-base"},
                                files={"file": ("c.safetensors", _bytes(names, header))})
        assert accepted.status_code == 201, (header, accepted.text)
        assert accepted.json()["family"] == "chroma"
    # a Flux.1 header alone is another family's, for a Chroma base as for a Klein one
    with pytest.raises(Exception, match="trained for Flux.1"):
        classify(names, "chroma", metadata={"ss_base_model_version": "flux1"})


#: Header values trainers write (ai-toolkit's ss_base_model_version, sd-scripts' and
#: musubi-tuner's modelspec.architecture, a base's name or file in ss_sd_model_name) -> the
#: families they name; a value naming none leaves the names to decide.
TRAINER_VALUES = {
    "flux2_klein_4b": {"flux2"}, "Flux.2-klein-9b/lora": {"flux2"},
    "black-forest-labs/FLUX.2-klein-4B": {"flux2"}, "Flux.2-dev/lora": {"flux2-dev"},
    "flux2": {"flux2-dev"}, "chroma/lora": {"chroma"}, "lodestones/Chroma1-HD": {"chroma"},
    "flux-1-dev/lora": {"flux"}, "flux1": {"flux"}, "sd3": {"sd3"},
    "stable-diffusion-3-5-large/lora": {"sd3"}, "Z-Image/lora": {"z-image"},
    "zimage_diffsynth": {"z-image"}, "Qwen-Image/lora": {"qwen-image"},
    "qwen_image": {"qwen-image"}, "sdxl_base_v1-0": {"stable-diffusion-xl"},
    "stable-diffusion-xl-v1-base/lora": {"stable-diffusion-xl"},
    "sd_xl_base_1.0.safetensors": {"stable-diffusion-xl"}, "sd_1.5": {"stable-diffusion"},
    "stable-diffusion-v1/lora": {"stable-diffusion"}, "sd_2.1": {"stable-diffusion"},
    "v1-5-pruned-emaonly.safetensors": set(), "wan_2.1": set(), "": set(),
}


def test_trainer_header_values_name_the_families_they_were_trained_for():
    from cgidm_core.family_evidence import METADATA_KEYS, metadata_claims

    for value, expected in TRAINER_VALUES.items():
        for key in METADATA_KEYS:
            assert set(metadata_claims({key: value})) == expected, (key, value)
    assert metadata_claims({"ss_output_name": "flux2_klein_4b"}) == {}  # not a base's key
