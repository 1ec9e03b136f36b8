"""The latent, text-conditioned demo family: the shipped base and LoRA load through the SD path,
LoRA fine-tunes in diffusers' and kohya's formats load unmerged with the adapter switched on and
off, and ``cgidm check`` runs a latent pair end to end.

The format tests build a small random base with the family's own builders (a second to make) so
they do not depend on the shipped weights; the others use the shipped models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cgidm_core import latent_finetune as lf
from cgidm_core import latent_training as lt
from cgidm_core.demo import demo_model_path
from cgidm_core.models import load_pair_from_paths
from cgidm_core.names import DEMO_FAMILIES, SD_FAMILY

LATENT_MODELS = ("demo-latent-base", "demo-latent-vangogh-lora")


@pytest.fixture(scope="module")
def random_base(tmp_path_factory) -> Path:
    """An untrained pipeline of the family's architecture (tokenizer from a small corpus)."""
    root = tmp_path_factory.mktemp("latent")
    tokenizer = lt.load_tokenizer(lt.write_clip_tokenizer(root / "tok",
                                                          lt.caption_corpus(0, scenes=50)))
    torch.manual_seed(0)
    return lt.save_sd_pipeline(root / "base", unet=lt.build_unet(), vae=lt.build_vae(),
                               text_encoder=lt.build_text_encoder(tokenizer),
                               tokenizer=tokenizer, scheduler=lt.build_scheduler())


def test_tokenizer_makes_caption_words_single_tokens(tmp_path):
    tokenizer = lt.load_tokenizer(lt.write_clip_tokenizer(tmp_path, lt.caption_corpus(0, 50)))
    assert tokenizer.tokenize(lt.TRIGGER_PROMPT) == [
        "a</w>", "painting</w>", "in</w>", "sks</w>", "style</w>"]
    # Any other text still tokenizes (byte symbols), without unknown tokens.
    ids = tokenizer("zebra #42 ünïcode").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]


def test_captioned_scenes_say_what_is_drawn():
    images, captions = lt.CaptionedScenes(32, seed=3)(6)
    assert images.shape == (6, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    for caption in captions:
        assert caption.startswith("a ") and caption.endswith(" background")
        assert any(shape in caption for shape in lt.SHAPES)


def _lora_with_random_b(base: Path, recipe: lf.LatentRecipe):
    parts = lt.load_parts(base)
    lf.add_lora(parts.unet, recipe)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in parts.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return parts


def test_lora_in_diffusers_and_kohya_format_loads_unmerged_and_equals_merged(random_base,
                                                                             tmp_path):
    """One adapter (attention + convolutions, alpha = rank / 2) saved in both formats: each
    loads through cgidm's LoRA path as a switchable adapter whose 'on' output equals the merged
    weights and whose 'off' output equals the base."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    recipe = lf.LatentRecipe("lora", 1, 1e-4, rank=4, targets="attn_conv", lora_alpha=2.0)
    parts = _lora_with_random_b(random_base, recipe)
    facts = {"members": ["x.png"], "steps": 1, "seed": 0, "members_loss_before": 1.0,
             "members_loss_after": 1.0}
    diffusers_dir = lf.save(parts, parts.unet, recipe, tmp_path / "diffusers", facts)
    kohya = dict(recipe.to_dict(), save_as="kohya")
    kohya_file = lf.save(parts, parts.unet, lf.LatentRecipe(**kohya),
                         tmp_path / "kohya" / "sks_style.safetensors", facts)
    for module in parts.unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 700])
    base = lt.load_parts(random_base).unet
    for path, source in ((diffusers_dir, "model_card"), (kohya_file, "safetensors_metadata")):
        pair = load_pair_from_paths(random_base, path, device="cpu")
        assert type(pair).__name__ == "StableDiffusionLoraPair"
        assert (pair.default_prompt, pair.default_prompt_source) == (lt.TRIGGER_PROMPT, source)
        cond = pair.conditioning(pair.default_prompt)
        hidden = cond.pretrained.expand(2, -1, -1)
        with torch.no_grad():
            merged = parts.unet(z, t, encoder_hidden_states=hidden).sample
            plain = base(z, t, encoder_hidden_states=hidden).sample
            on, off = pair.eps_finetuned(z, t, cond), pair.eps_pretrained(z, t, cond)
        assert (on - plain).abs().max() > 1e-3  # the adapter does something
        torch.testing.assert_close(on, merged, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(off, plain, atol=1e-6, rtol=1e-5)


def test_kohya_file_carries_lora_unet_keys_with_alpha(random_base, tmp_path):
    from safetensors import safe_open

    recipe = lf.LatentRecipe("lora", 1, 1e-4, rank=4, targets="attn_conv", lora_alpha=2.0,
                             save_as="kohya")
    parts = _lora_with_random_b(random_base, recipe)
    facts = {"members": ["x.png"], "steps": 1, "seed": 0, "members_loss_before": 1.0,
             "members_loss_after": 1.0}
    file = lf.save(parts, parts.unet, recipe, tmp_path / "k" / "sks_style.safetensors", facts)
    with safe_open(str(file), "pt") as handle:
        keys = list(handle.keys())
        assert all(k.startswith("lora_unet_") for k in keys)
        alphas = [k for k in keys if k.endswith(".alpha")]
        assert alphas and all(float(handle.get_tensor(k)) == 2.0 for k in alphas)
        assert any("_resnets_0_conv1." in k for k in keys)  # convolutions were adapted
        assert json.loads(handle.metadata()["ss_tag_frequency"])


def test_finetune_saves_checkpoints_with_the_members_loss_drop(random_base, tmp_path):
    members = []
    for i in range(2):
        from PIL import Image

        members.append(tmp_path / f"m{i}.png")
        Image.new("RGB", (40, 40), (40 * i, 120, 200)).save(members[-1])
    recipe = lf.LatentRecipe("full", 2, 1e-3, batch_size=2, save_as="pipeline")
    facts = lf.finetune(random_base, members, recipe, 0,
                        {1: tmp_path / "s1", 2: tmp_path / "s2"}, log=lambda _m: None,
                        loss_samples=8)
    assert set(facts) == {1, 2}
    assert facts[2]["members_loss_drop"] > 0
    assert json.loads((tmp_path / "s2" / "training.json").read_text())["steps"] == 2
    assert (tmp_path / "s2" / "model_index.json").is_file()


def test_latent_demo_models_are_registered_as_stable_diffusion():
    for name in LATENT_MODELS:
        assert DEMO_FAMILIES[name] == SD_FAMILY
    index = json.loads((demo_model_path("demo-latent-base") / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]


def test_shipped_latent_models_are_small():
    def size(name: str) -> int:
        return sum(p.stat().st_size for p in demo_model_path(name).rglob("*") if p.is_file())

    assert size("demo-latent-base") <= 12 * 1000 * 1000
    assert size("demo-latent-vangogh-lora") <= 2 * 1000 * 1000


def test_shipped_pair_loads_through_the_sd_lora_path():
    from cgidm_core.api import load_pair

    pair = load_pair("demo-latent-base", "demo-latent-vangogh-lora", device="cpu")
    assert pair.family == SD_FAMILY and type(pair).__name__ == "StableDiffusionLoraPair"
    assert pair.image_size == lt.LATENT_IMAGE_SIZE
    assert pair.latent_shape == (4, 8, 8)
    assert pair.default_prompt == lt.TRIGGER_PROMPT


@pytest.mark.slow  # two 32 px images, 5 PGD steps each, through the whole check: ~10 s
def test_cgidm_check_runs_the_latent_pair_end_to_end(tmp_path):
    from PIL import Image

    from cgidm.cli import main

    images = []
    for i, colour in enumerate(((200, 40, 40), (30, 90, 200))):
        images.append(tmp_path / f"img{i}.png")
        Image.new("RGB", (48, 48), colour).save(images[-1])
    out = tmp_path / "out"
    code = main(["check", "--pretrained", "demo-latent-base", "--finetuned",
                 "demo-latent-vangogh-lora", "--device", "cpu", "--steps", "5",
                 "--out", str(out), *map(str, images)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    assert settings["prompt"] == lt.TRIGGER_PROMPT
    assert settings["prompt_source"] == "model_card"
    assert settings["pair"]["family"] == SD_FAMILY
    assert settings["pair"]["latent_shape"] == [4, 8, 8]
    assert settings["pair"]["lora_unet_layers"] > 0
    assert [r["name"] for r in results["images"]] == ["img0.png", "img1.png"]
    assert list(out.rglob("*.png"))  # the recovered pictures
