"""The torch-free safetensors check the gateway runs on uploads, against real files."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from cgidm.model_files import (
    ModelFileError,
    classify,
    header_length,
    parse_header,
    prompt_from_metadata,
    read_header,
)


def test_real_safetensors_files_pass_with_their_exact_size(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.float16),
               "c": torch.zeros(0), "d": torch.arange(4, dtype=torch.int64),
               "e": torch.zeros(2, dtype=torch.bfloat16), "f": torch.zeros(1, dtype=torch.bool)}
    save_file(tensors, str(path), metadata={"instance_prompt": "sks dog"})
    header = read_header(str(path))
    assert sorted(header.names) == sorted(tensors)
    assert header.file_bytes == path.stat().st_size
    assert header.dtypes() == {"F32": 2, "F16": 1, "I64": 1, "BF16": 1, "BOOL": 1}
    assert prompt_from_metadata(header.metadata) == "sks dog"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ModelFileError, match="truncated"):
        read_header(str(path))


@pytest.mark.parametrize("entries, words", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "needs 8"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "starts at 4"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, "exactly"),
    ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "invalid shape"),
    ({}, "no tensors"),
    ({"__metadata__": {"k": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
     "__metadata__"),
])
def test_inconsistent_headers_are_refused(entries, words):
    with pytest.raises(ModelFileError, match=words):
        parse_header(json.dumps(entries).encode())


def test_header_length_bounds_and_pickles():
    assert header_length(struct.pack("<Q", 100)) == 100
    for bad in (struct.pack("<Q", 1), struct.pack("<Q", 2**40)):
        with pytest.raises(ModelFileError) as err:
            header_length(bad)
        assert err.value.code == "corrupt_safetensors"
    for magic in (b"PK\x03\x04\x00\x00\x00\x00", b"\x80\x02}q\x00(X\x00"):
        with pytest.raises(ModelFileError) as err:
            header_length(magic)
        assert err.value.code == "pickle_checkpoint"


SD_UNET = ["conv_in.weight", "time_embedding.linear_1.weight",
           "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
PIXEL_UNET = ["conv_in.weight", "time_embedding.linear_1.weight",
              "down_blocks.0.resnets.0.conv1.weight"]


@pytest.mark.parametrize("names, family, kind, expected", [
    (["unet.a.lora_A.weight", "unet.a.lora_B.weight"], "stable-diffusion", None, "lora"),
    (["lora_unet_down.lora_down.weight", "lora_unet_down.alpha"], "stable-diffusion", None,
     "lora"),
    (["model.diffusion_model.input_blocks.0.0.weight"], "stable-diffusion", None,
     "single_file"),
    (SD_UNET, "stable-diffusion", "unet", "unet"),
    (PIXEL_UNET, "ddpm", None, "unet"),
    # files of families that take uploads, against a base of another family
    (["lora_te2_text_model.x.lora_down.weight"], "stable-diffusion", None, "family_mismatch"),
    (["conditioner.embedders.0.x", "model.diffusion_model.x"], "stable-diffusion", None,
     "family_mismatch"),
    (["transformer_blocks.0.attn.to_q.weight", "x_embedder.weight"], "stable-diffusion", None,
     "unsupported_family"),
    (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], "stable-diffusion", None,
     "family_mismatch"),
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "stable-diffusion", None,
     "family_mismatch"),
    (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "stable-diffusion", None,
     "unsupported_family"),
    # single files of transformer families, which carry the LDM prefix that would otherwise
    # read as an SD single file (SD 3.5, Z-Image)
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "stable-diffusion", None,
     "family_mismatch"),
    (["model.diffusion_model.noise_refiner.0.attention.qkv.weight",
      "model.diffusion_model.context_refiner.0.attention.qkv.weight",
      "model.diffusion_model.cap_embedder.1.weight"], "stable-diffusion", None,
     "family_mismatch"),
    (PIXEL_UNET, "stable-diffusion", None, "family_mismatch"),
    (SD_UNET, "ddpm", None, "family_mismatch"),
    # pixel LoRA files (diffusers or kohya names, as cgidm_core.pixel_lora writes them) are
    # uploads of both pixel families (#27: audits swap them on the loaded base) ...
    (["unet.a.lora_A.weight"], "ddpm", None, "lora"),
    (["lora_unet_mid_block_attentions_0_to_q.lora_down.weight",
      "lora_unet_mid_block_attentions_0_to_q.alpha"], "pixel-flow", "lora", "lora"),
    # ... but a LoRA of a text-conditioned UNet (SD's cross-attention names) is not
    (["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"],
     "ddpm", None, "family_mismatch"),
    (["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "pixel-flow", None,
     "family_mismatch"),
    # the flow family takes LoRA uploads only: its bare UNet weights are refused, saying so
    (PIXEL_UNET, "pixel-flow", None, "unsupported_upload_kind"),
    (SD_UNET, "stable-diffusion", "lora", "kind_mismatch"),
    (["vae.encoder.weight"], "stable-diffusion", None, "unknown_model_file"),
])
def test_names_must_fit_the_family_and_kind(names, family, kind, expected):
    if expected in ("lora", "single_file", "unet"):
        assert classify(names, family, kind) == expected
    else:
        with pytest.raises(ModelFileError) as err:
            classify(names, family, kind)
        assert err.value.code == expected


def test_real_lora_file_is_a_lora(tiny_sd_pair, tmp_path):
    from cgidm_testkit import tinymodels

    lora = tinymodels.make_lora(tiny_sd_pair[0], tmp_path / "lora", as_file=True,
                                with_text_encoder=True)
    assert classify(read_header(str(lora)).names, "stable-diffusion") == "lora"
