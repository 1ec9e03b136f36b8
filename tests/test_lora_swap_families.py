"""LoRA swapping beyond the pixel and SD 1.x families (cgidm_core.lora_swap with each family
adapter's ``load_lora_base``): on tiny random SDXL, Flux.1 and Z-Image (the diffusion-transformer
families' shared adapter) bases, a swapped LoRA pair scores
float for float as the pair ``load_pair`` loads from the same file, removing the adapter gives
back a base that computes bit for bit what it computed before, and an audit of two LoRAs of one
SDXL base loads that base once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cgidm_core import families
from cgidm_core.api import load_pair
from cgidm_core.audit import AuditModel
from cgidm_core.audit_run import AuditSettings, run_audit, screen_records
from cgidm_core.lora_swap import LoraSwapLoader, swapped_families
from cgidm_core.names import FLUX_FAMILY, SDXL_FAMILY, ZIMAGE_FAMILY
from cgidm_testkit import tinymodels

PROMPT = "sks style"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Per family, made on first use: a tiny base and two LoRAs of it, one in diffusers' layout
    and one in kohya-ss's (with text-encoder layers, and for Flux the guidance and shift kohya
    records)."""
    root = tmp_path_factory.mktemp("swap")
    made: dict[str, tuple[Path, list[Path]]] = {}

    def get(family: str) -> tuple[Path, list[Path]]:
        if family not in made:
            made[family] = _make(family, root)
        return made[family]

    return get


def _make(family: str, root: Path) -> tuple[Path, list[Path]]:
    if family == SDXL_FAMILY:
        xl = tinymodels.make_tiny_sdxl(root / "xl")
        return xl, [tinymodels.make_sdxl_lora(xl, root / "xl_lora", seed=3),
                    tinymodels.make_sdxl_kohya_lora(xl, root / "xl_kohya.safetensors", seed=4)]
    if family == ZIMAGE_FAMILY:  # the diffusion-transformer families' shared adapter
        from cgidm_testkit import tiny_families

        zimage = tiny_families.make_tiny_zimage(root / "zimage")
        return zimage, [tiny_families.make_zimage_lora(zimage, root / "z_lora", seed=3),
                        tiny_families.make_zimage_lora(zimage, root / "z_comfy.safetensors",
                                                       seed=4, naming="comfy")]
    flux = tinymodels.make_tiny_flux(root / "flux")
    meta = {"ss_guidance_scale": "2.5", "ss_timestep_sampling": "shift",
            "ss_discrete_flow_shift": "3.1",
            "ss_tag_frequency": json.dumps({"1_sks style": {"sks style": 3}})}
    return flux, [tinymodels.make_flux_lora(flux, root / "flux_lora", seed=3),
                  tinymodels.make_flux_kohya_lora(flux, root / "flux_kohya.safetensors", seed=4,
                                                  metadata=meta)]


def _pictures(n: int, seed: int) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(32, 32, 3, generator=generator) * 255).byte().numpy())
            for _ in range(n)]


def _loader() -> LoraSwapLoader:
    return LoraSwapLoader(lambda m: load_pair(m.pretrained, m.finetuned, device="cpu"),
                          lambda m: (Path(m.pretrained), Path(m.finetuned)), device="cpu")


def _outputs(network: torch.nn.Module) -> torch.Tensor:
    """What ``network`` (an SDXL UNet, a Flux transformer, a CLIP text encoder) computes for a
    fixed seeded input."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    with torch.no_grad():
        if isinstance(network, UNet2DConditionModel):
            c = network.config
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            return network(randn(1, c.in_channels, 8, 8), torch.tensor([500]),
                           encoder_hidden_states=randn(1, 5, c.cross_attention_dim),
                           added_cond_kwargs={"text_embeds": randn(1, pooled),
                                              "time_ids": randn(1, 6)}).sample
        if isinstance(network, FluxTransformer2DModel):
            c = network.config
            return network(hidden_states=randn(1, 16, c.in_channels),
                           encoder_hidden_states=randn(1, 4, c.joint_attention_dim),
                           pooled_projections=randn(1, c.pooled_projection_dim),
                           timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                           txt_ids=torch.zeros(4, 3), guidance=torch.tensor([3.5])).sample
        if hasattr(network, "get_input_embeddings"):  # a text encoder
            return network(input_ids=torch.arange(1, 9)[None]).last_hidden_state
    return torch.empty(0)  # another denoiser: its modules and weights are compared


def _structure(network: torch.nn.Module) -> list[tuple[str, str]]:
    return [(name, type(module).__name__) for name, module in network.named_modules()]


def test_every_family_with_lora_support_swaps():
    """No family's LoRAs are left to the per-model fallback by accident: every registered
    family whose fine-tune layouts include LoRA files has an adapter that keeps a base."""
    with_loras = {f.name for f in families.FAMILIES if "lora" in f.finetuned_layouts}
    assert {SDXL_FAMILY, FLUX_FAMILY} <= with_loras
    assert set(swapped_families()) == with_loras


@pytest.mark.parametrize("family", [SDXL_FAMILY, FLUX_FAMILY, ZIMAGE_FAMILY])
def test_a_swapped_lora_scores_as_check_loads_it_and_the_base_comes_back_bit_for_bit(
        bases, family):
    base_path, loras = bases(family)
    loader = _loader()
    base = loader._base(base_path, families.get(family))
    assert base is not None
    before = [(_structure(n), {k: v.clone() for k, v in n.state_dict().items()}, _outputs(n))
              for n in base.adapted]
    images, names = _pictures(1, seed=1), ["a.png"]
    for lora in loras:
        with loader.open(AuditModel(str(base_path), str(lora))) as pair:
            swapped = screen_records(pair, images, names, PROMPT, seed=0, resolution=16)
            swapped_describe = pair.describe()
            swapped_prompt = (pair.default_prompt, pair.default_prompt_source)
        fresh_pair = load_pair(str(base_path), str(lora), device="cpu")
        fresh = screen_records(fresh_pair, images, names, PROMPT, seed=0, resolution=16)
        assert swapped == fresh  # the same floats, not merely close
        fresh_describe = fresh_pair.describe()
        # the same pair but for the text encoders, which the swapped one keeps (the base's)
        assert swapped_describe.pop("keep_text_encoders") and \
            not fresh_describe.pop("keep_text_encoders")
        assert swapped_describe == fresh_describe
        assert swapped_prompt == (fresh_pair.default_prompt, fresh_pair.default_prompt_source)
    if family == FLUX_FAMILY:  # the kohya file's recorded guidance and shift reached the pair
        assert (swapped_describe["guidance"], swapped_describe["time_shift_at_native_size"]) \
            == (2.5, 3.1)
    if family != ZIMAGE_FAMILY:  # its LoRAs adapt the transformer only
        assert swapped_describe["lora_text_encoder_layers"] > 0  # the text encoders were adapted
    for network, (structure, weights, outputs) in zip(base.adapted, before, strict=True):
        assert _structure(network) == structure  # no peft wrapper left
        state = network.state_dict()
        assert state.keys() == weights.keys()
        assert all(torch.equal(v, weights[k]) for k, v in state.items())
        assert torch.equal(_outputs(network), outputs)
    assert (loader.stats.base_loads, loader.stats.swaps, loader.stats.fallback_loads) == (1, 2, 0)


def test_an_audit_of_two_loras_of_one_sdxl_base_loads_it_once(bases):
    """The swapped pairs' scores are checked against load_pair's above; here: the audit's
    loader gives the base's two LoRAs their own pairs (different screen values), loading the
    base once."""
    base_path, loras = bases(SDXL_FAMILY)
    models = [AuditModel(str(base_path), str(lora), PROMPT) for lora in loras]
    settings = AuditSettings(clear_p=0.0)  # screen only: every model is cleared, quickly
    loader = _loader()
    entries = run_audit(models, _pictures(1, seed=2), _pictures(1, seed=3), ["m.png"], ["c.png"],
                        loader, settings)
    assert [e["finetuned"] for e in entries] == [str(lora) for lora in loras]
    assert all(e["tier"] == "screen" for e in entries)
    assert entries[0]["images"] != entries[1]["images"]
    assert (loader.stats.base_loads, loader.stats.swaps, loader.stats.fallback_loads) == (1, 2, 0)
    assert loader.stats.bases == [str(base_path)]
