"""``cgidm check`` end to end on a tiny LoRA pair of each new family (Chroma, Z-Image,
Qwen-Image, Flux.2 Klein and dev; SD 3.5's is in test_sd3.py, SDXL v-pred's in
test_sdxl_vpred.py): detection, loading, the inversion at 32 px and results.json, from the
command line as a user runs it.

Each case costs 3.5-5 s on the shared 2 cores once torch, diffusers, transformers, peft and
torchmetrics are imported; the first test of a fresh process pays about 40 s of those imports
(that, not Flux.2 dev's Mistral-3 encode, was the 45 s once measured for Flux.2 dev alone)."""

from __future__ import annotations

import json

import pytest

from cgidm.cli import main
from cgidm_testkit import tiny_families
from tests.paths import SHARED_DATA

FAMILIES = {
    "chroma": (tiny_families.make_tiny_chroma, tiny_families.make_chroma_lora),
    "z-image": (tiny_families.make_tiny_zimage, tiny_families.make_zimage_lora),
    "qwen-image": (tiny_families.make_tiny_qwen_image, tiny_families.make_qwen_image_lora),
    "flux2": (tiny_families.make_tiny_flux2_klein, tiny_families.make_flux2_lora),
    "flux2-dev": (tiny_families.make_tiny_flux2_dev, tiny_families.make_flux2_dev_lora),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_check_cli_on_a_tiny_lora_pair(family, tmp_path, capsys):
    make_base, make_lora = FAMILIES[family]
    base = make_base(tmp_path / "base")
    lora = make_lora(base, tmp_path / "lora", seed=5)
    picture = sorted((SHARED_DATA / "wikiart-vangogh" / "membership").glob("*.jpg"))[0]
    out = tmp_path / "out"
    code = main(["check", "--pretrained", str(base), "--finetuned", str(lora), "--steps", "1",
                 "--resolution", "32", "--prompt", "sks style", "--out", str(out), str(picture)])
    assert code == 0, capsys.readouterr()
    doc = json.loads((out / "results.json").read_text())
    assert doc["settings"]["pair"]["family"] == family
    assert doc["settings"]["pair"]["finetuned_kind"] == "lora"
    assert len(doc["images"]) == 1
