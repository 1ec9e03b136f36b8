"""``cgidm check`` end to end on a tiny LoRA pair of each new family (Chroma, Z-Image,
Qwen-Image, Flux.2 Klein; SD 3.5's is in test_sd3.py) and on a Klein single-file transformer:
detection, loading, the inversion at 32 px and results.json, from the command line as a user runs
it. Flux.2 dev is among them; SDXL v-pred's is in test_sdxl_vpred.py.

Each case costs 3.5-5 s on the shared 2 cores once torch, diffusers, transformers, peft and
torchmetrics are imported; the first test of a fresh process pays about 40 s of those imports
(that, not Flux.2 dev's Mistral-3 encode, was the 45 s once measured for Flux.2 dev alone)."""

from __future__ import annotations

import json

import pytest

from cgidm.cli import main
from cgidm_testkit import tiny_families
from tests.paths import SHARED_DATA

#: case -> (family, its tiny base, a fine-tune of it, that fine-tune's layout)
FAMILIES = {
    "chroma": ("chroma", tiny_families.make_tiny_chroma, tiny_families.make_chroma_lora, "lora"),
    "z-image": ("z-image", tiny_families.make_tiny_zimage, tiny_families.make_zimage_lora,
                "lora"),
    "qwen-image": ("qwen-image", tiny_families.make_tiny_qwen_image,
                   tiny_families.make_qwen_image_lora, "lora"),
    "flux2": ("flux2", tiny_families.make_tiny_flux2_klein, tiny_families.make_flux2_lora,
              "lora"),
    "flux2-dev": ("flux2-dev", tiny_families.make_tiny_flux2_dev,
                  tiny_families.make_flux2_dev_lora, "lora"),
    # a Klein transformer as BFL / ComfyUI publish it (one file, BFL naming)
    "flux2-single-file": ("flux2", tiny_families.make_tiny_flux2_klein,
                          lambda base, out, seed: tiny_families.make_flux2_klein_single_file(
                              base, out.with_suffix(".safetensors"), seed), "single_file"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_check_cli_on_a_tiny_pair(case, tmp_path, capsys):
    family, make_base, make_finetune, kind = FAMILIES[case]
    base = make_base(tmp_path / "base")
    finetuned = make_finetune(base, tmp_path / "finetuned", seed=5)
    picture = sorted((SHARED_DATA / "wikiart-vangogh" / "membership").glob("*.jpg"))[0]
    out = tmp_path / "out"
    code = main(["check", "--pretrained", str(base), "--finetuned", str(finetuned), "--steps",
                 "1", "--resolution", "32", "--prompt", "sks style", "--out", str(out),
                 str(picture)])
    assert code == 0, capsys.readouterr()
    doc = json.loads((out / "results.json").read_text())
    assert doc["settings"]["pair"]["family"] == family
    assert doc["settings"]["pair"]["finetuned_kind"] == kind
    assert len(doc["images"]) == 1
