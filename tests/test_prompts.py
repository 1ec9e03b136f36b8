"""Which prompt a check uses: given > registry > kohya header > model card > empty (warned)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from cgidm_core.prompts import (
    EMPTY_PROMPT_WARNING,
    choose_prompt,
    finetune_prompt,
    prompt_from_kohya_metadata,
    prompt_from_model_card,
    safetensors_metadata,
)


def _pair(default=None, source=None, conditional=True):
    return SimpleNamespace(default_prompt=default, default_prompt_source=source,
                           default_prompt_origin="x", conditional=conditional)


def test_precedence():
    found = _pair("sks dog", "model_card")
    assert choose_prompt("given", found, registry_prompt="reg").source == "given"
    assert choose_prompt(None, found, registry_prompt="reg").text == "reg"
    assert choose_prompt(None, found).to_settings()["prompt_source"] == "model_card"
    assert choose_prompt("", found).source == "given"  # an explicit empty prompt is a choice
    empty = choose_prompt(None, _pair())
    assert (empty.text, empty.source, empty.warning) == ("", "empty", EMPTY_PROMPT_WARNING)
    assert empty.to_settings()["prompt_warning"] == EMPTY_PROMPT_WARNING
    unconditional = choose_prompt("ignored", _pair(conditional=False))
    assert (unconditional.text, unconditional.source) == (None, "unconditional")


def test_kohya_metadata():
    tags = {"10_ohwx woman": {"ohwx woman": 12, "smiling": 3}, "reg": {"ohwx woman": 2}}
    assert prompt_from_kohya_metadata({"ss_tag_frequency": json.dumps(tags)}) == (
        "ohwx woman", "ss_tag_frequency")
    no_captions = {"ss_tag_frequency": json.dumps({"20_sks style": {}}), "ss_output_name": "n"}
    assert prompt_from_kohya_metadata(no_captions)[0] == "sks style"
    assert prompt_from_kohya_metadata({"ss_output_name": "vangogh_v1"}) == (
        "vangogh_v1", "ss_output_name")
    assert prompt_from_kohya_metadata({"ss_tag_frequency": "not json"}) is None
    assert prompt_from_kohya_metadata({}) is None


def test_model_cards():
    diffusers_card = ("---\ninstance_prompt: a photo of sks dog\nwidget: []\n---\n"
                      "You should use a photo of sks dog to trigger the image generation.")
    assert prompt_from_model_card(diffusers_card) == "a photo of sks dog"
    lora_card = "## Trigger words\n\nYou should use `pixel art style` to trigger the image."
    assert prompt_from_model_card(lora_card) == "pixel art style"
    civitai = "Some text\nTrigger words: zzmonet, oil painting\n"
    assert prompt_from_model_card(civitai) == "zzmonet, oil painting"
    assert prompt_from_model_card("---\ninstance_prompt: null\n---\n") is None
    assert prompt_from_model_card("# A model\nno trigger here") is None


def test_finetune_prompt_reads_the_header_then_the_card(tmp_path):
    weights = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1)}, str(weights),
              metadata={"ss_output_name": "my_lora"})
    assert safetensors_metadata(weights) == {"ss_output_name": "my_lora"}
    assert finetune_prompt(weights) == ("my_lora", "safetensors_metadata",
                                        "lora.safetensors: ss_output_name")
    plain = tmp_path / "plain"
    plain.mkdir()
    bare = plain / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1)}, str(bare))
    assert finetune_prompt(bare) is None
    (plain / "README.md").write_text("instance_prompt: sks cat\n", encoding="utf-8")
    assert finetune_prompt(bare)[:2] == ("sks cat", "model_card")
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 20)
    assert safetensors_metadata(tmp_path / "broken.safetensors") == {}
