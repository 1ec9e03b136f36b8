"""LoRAs swapped in and out of one loaded base (cgidm_core.lora_swap): pixel LoRA files load
unmerged, the base is restored bit for bit after each LoRA, a swapped-in LoRA scores exactly as
the same pair loaded fresh, and an audit loads each base once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cgidm_core import families
from cgidm_core.api import load_pair
from cgidm_core.audit import AuditModel
from cgidm_core.audit_run import AuditSettings, run_audit, screen_records
from cgidm_core.demo import resolve_model_reference
from cgidm_core.errors import ModelFormatError
from cgidm_core.images import load_image
from cgidm_core.lora_swap import LoraSwapLoader, local_paths
from cgidm_core.models.pixel_lora_loading import DDPMLoraPair
from cgidm_core.pixel_lora import PixelLoraRecipe, add_lora, merge_lora_file, save_lora
from cgidm_core.training import load_pipeline_parts
from tests.paths import SHARED_DATA, require_shared_data


def _random_lora(folder: Path, seed: int) -> tuple[Path, Path]:
    """A rank-4 attention + convolution LoRA of demo-base with alpha = rank / 2 and seeded
    random B matrices (peft starts them at 0: every LoRA would equal the base), in both files."""
    unet, _ = load_pipeline_parts(resolve_model_reference("demo-base"))
    recipe = PixelLoraRecipe(rank=4, targets="attn_conv", lora_alpha=2.0)
    add_lora(unet, recipe)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return save_lora(unet, recipe, folder)


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> list[tuple[Path, Path]]:
    """Two LoRAs of demo-base: (diffusers file, kohya file) each."""
    return [_random_lora(tmp_path_factory.mktemp(f"lora{seed}"), seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def pictures():
    require_shared_data()
    files = sorted((SHARED_DATA / "wikiart-vangogh" / "membership").iterdir())[:2] + \
        sorted((SHARED_DATA / "wikiart-vangogh" / "hold_out").iterdir())[:2]
    return [load_image(p) for p in files], [p.name for p in files]


def _probe(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed)),
            torch.tensor([20, 400, 900]))


def test_a_pixel_lora_file_loads_unmerged_on_one_unet_and_computes_its_merge(loras):
    diffusers_file, kohya_file = loras[0]
    pair = load_pair("demo-base", str(diffusers_file))
    assert isinstance(pair, DDPMLoraPair) and pair.unet_pretrained is pair.unet_finetuned
    assert pair.describe()["finetuned_kind"] == "lora" and pair.describe()["lora_unet_layers"]
    from_kohya = load_pair("demo-base", str(kohya_file))
    merged, _ = merge_lora_file(diffusers_file, resolve_model_reference("demo-base"))
    base, _ = load_pipeline_parts(resolve_model_reference("demo-base"))
    x, t = _probe()
    cond = pair.conditioning(None)
    with torch.no_grad():
        finetuned = pair.eps_finetuned(x, t, cond)
        assert torch.equal(from_kohya.eps_finetuned(x, t, cond), finetuned)
        assert torch.allclose(finetuned, merged(x, t).sample, atol=1e-4)  # alpha/rank honoured
        assert torch.equal(pair.eps_pretrained(x, t, cond), base(x, t).sample)
        assert not torch.allclose(finetuned, base(x, t).sample, atol=1e-3)


def test_swapping_loras_restores_the_base_bit_for_bit_and_scores_as_a_fresh_load(loras,
                                                                                   pictures):
    from peft.tuners.tuners_utils import BaseTunerLayer

    images, names = pictures
    loader = LoraSwapLoader(lambda m: load_pair(m.pretrained, m.finetuned), local_paths)
    # the base the loader keeps, before any LoRA has been attached
    base = loader._base(resolve_model_reference("demo-base"), families.get("ddpm"))
    assert base is not None
    unet = base.adapted[0]
    x, t = _probe()
    with torch.no_grad():
        before = unet(x, t).sample
    weights_before = {k: v.clone() for k, v in unet.state_dict().items()}
    images, names = images[1:3], names[1:3]  # one member, one hold-out
    for lora in (loras[0][0], loras[1][1]):  # a diffusers file, then a kohya one
        with loader.open(AuditModel("demo-base", str(lora))) as pair:
            assert pair.unet_pretrained is unet
            swapped = screen_records(pair, images, names, None, seed=0)
        fresh = screen_records(load_pair("demo-base", str(lora)), images, names, None, seed=0)
        assert swapped == fresh  # the same floats, not merely close
    assert not any(isinstance(m, BaseTunerLayer) for m in unet.modules())
    assert unet.state_dict().keys() == weights_before.keys()
    assert all(torch.equal(v, weights_before[k]) for k, v in unet.state_dict().items())
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, before)
    assert loader.stats.base_loads == 1 and loader.stats.swaps == 2


def test_an_audit_loads_the_base_once_and_decides_as_with_a_pair_per_model(loras, pictures):
    images, names = pictures
    models = [AuditModel("demo-base", str(loras[0][0])), AuditModel("demo-base", str(loras[1][1]))]
    settings = AuditSettings(clear_p=0.0)  # screen only: every model is cleared, quickly
    plain = run_audit(models, images[:2], images[2:], names[:2], names[2:],
                      lambda m: load_pair(m.pretrained, m.finetuned), settings)
    loader = LoraSwapLoader(lambda m: load_pair(m.pretrained, m.finetuned), local_paths)
    swapped = run_audit(models, images[:2], images[2:], names[:2], names[2:], loader, settings)

    def decisions(entries):
        return [{k: e[k] for k in ("finetuned", "screen_p_value", "p_value", "tier", "images")}
                for e in entries]

    assert decisions(swapped) == decisions(plain)
    assert (loader.stats.base_loads, loader.stats.swaps, loader.stats.fallback_loads) == (1, 2, 0)


def test_a_lora_that_fits_no_layer_is_refused_and_leaves_the_base_clean(loras, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(loras[0][1]))
    key = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[key.replace("lora_unet_", "lora_unet_no_such_block_")] = tensors.pop(key)
    bad = tmp_path / "bad_kohya.safetensors"
    save_file(tensors, str(bad))
    loader = LoraSwapLoader(lambda m: load_pair(m.pretrained, m.finetuned), local_paths)
    with pytest.raises(ModelFormatError, match="fits no layer"), \
            loader.open(AuditModel("demo-base", str(bad))):
        pass
    base = loader._base(resolve_model_reference("demo-base"), families.get("ddpm"))
    assert base is not None
    assert not any(isinstance(m, BaseTunerLayer) for m in base.adapted[0].modules())


def test_worker_subtasks_of_one_base_find_it_loaded(loras):
    """worker/audit_swap.py: each audit subtask makes its own loader, but the process keeps the
    base, so the second subtask of that base (routed to this worker by the base) loads nothing;
    a full fine-tune goes to the subtask's own loader (the worker's pair cache)."""
    from types import SimpleNamespace

    from cgidm.registry import ModelEntry, Registry
    from worker.audit_swap import swapping_loader

    registry = Registry([
        ModelEntry(id="demo-base", family="ddpm", path="demo-base"),
        ModelEntry(id="demo-vangogh", family="ddpm", path="demo-vangogh",
                   finetuned_from="demo-base"),
        *[ModelEntry(id=f"lora-{i}", family="ddpm", path=str(files[0]),
                     finetuned_from="demo-base", kind="lora") for i, files in enumerate(loras)]],
        "test registry")
    resolver = SimpleNamespace(check_pair=registry.check_pair)
    from worker.model_cache import ModelCache

    ctx = SimpleNamespace(settings=SimpleNamespace(device="cpu", dtype=None), disk=None,
                          cache=ModelCache(10**9, lambda key: None))
    fallback_calls = []

    def fallback(model):
        fallback_calls.append(model.finetuned)
        return load_pair("demo-base", "demo-vangogh")

    loaders = [swapping_loader(ctx, resolver, fallback) for _ in range(2)]
    for loader, model in zip(loaders, ("lora-0", "lora-1"), strict=True):
        with loader.open(AuditModel("demo-base", model)) as pair:
            assert isinstance(pair, DDPMLoraPair)
    with loaders[1].open(AuditModel("demo-base", "demo-vangogh")) as pair:
        assert pair.finetuned_kind == "ddpm"
    assert [loader.stats.base_loads for loader in loaders] == [1, 0]
    assert fallback_calls == ["demo-vangogh"]


def test_the_kept_base_counts_in_the_worker_cache_budget(loras, caplog):
    """worker/model_cache.py's budget holds the swap slot's base beside the cached pairs: keeping
    the base evicts pairs to make room, a pair load evicts the base in turn (the next LoRA loads
    it again), and a base larger than the whole budget is not kept: its LoRAs load as pairs
    through the fallback, with a log line, and the base is not loaded again for each of them."""
    import logging

    from cgidm_core.lora_swap import BaseSlot
    from worker.model_cache import ModelCache

    pair_bytes = load_pair("demo-base", "demo-vangogh").resident_bytes()
    base_bytes = LoraSwapLoader(load_pair, local_paths)._base(
        resolve_model_reference("demo-base"), families.get("ddpm")).resident_bytes()
    assert 0 < base_bytes < pair_bytes  # one UNet of the two
    fallback_calls = []

    def fallback(model):
        fallback_calls.append(model.finetuned)
        return load_pair(model.pretrained, model.finetuned)

    def audit_one(loader, lora):
        with loader.open(AuditModel("demo-base", str(lora))) as pair:
            return type(pair).__name__

    cache = ModelCache(pair_bytes + base_bytes - 1, lambda key: load_pair("demo-base", key))
    cache.get("demo-vangogh")
    loader = LoraSwapLoader(fallback, local_paths, slot=BaseSlot(budget=cache))
    assert audit_one(loader, loras[0][0]) == "DDPMLoraPair"
    assert (cache.stats().entries, cache.stats().evictions, cache.total_bytes) == \
        (1, 1, base_bytes)  # the pair made room for the base
    cache.get("demo-vangogh")  # a check job's pair: the base makes room for it
    assert loader.slot.loaded is None and cache.total_bytes == pair_bytes
    assert audit_one(loader, loras[1][0]) == "DDPMLoraPair"
    assert loader.stats.base_loads == 2 and fallback_calls == []

    small = ModelCache(base_bytes - 1, lambda key: load_pair("demo-base", key))
    loader = LoraSwapLoader(fallback, local_paths, slot=BaseSlot(budget=small))
    with caplog.at_level(logging.WARNING, logger="cgidm.lora_swap"):
        kinds = [audit_one(loader, lora[0]) for lora in loras]
    assert kinds == ["DDPMLoraPair", "DDPMLoraPair"]  # load_pair's own LoRA pairs
    assert fallback_calls == [str(loras[0][0]), str(loras[1][0])]
    assert (loader.stats.base_loads, loader.stats.swaps, loader.stats.fallback_loads) == (1, 0, 2)
    assert loader.slot.loaded is None and small.total_bytes == 0
    assert "larger than the worker's model cache budget" in caplog.text
    assert len(caplog.records) == 1


def test_an_uploaded_lora_swaps_from_the_disk_cache_and_is_unpinned_after(loras, tmp_path):
    """worker/audit_swap.py: a LoRA uploaded through the service (its record says kind lora;
    its bytes are in storage) is fetched into the worker's disk cache, verified, attached to the
    loaded base like a registry LoRA, and its pin is released when the model is done; uploaded
    UNet weights still go to the subtask's own loader; bytes that are not the uploaded ones
    never reach the base (the fallback reports them). A job's loader (worker/context.py) loads
    the same upload as a pair of its own that computes the same."""
    import hashlib
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from cgidm.registry import ModelEntry
    from cgidm.storage import LocalStorage
    from cgidm.uploaded_models import UploadedModel
    from worker.audit_swap import swapping_loader
    from worker.disk_cache import DiskCache

    storage = LocalStorage(tmp_path / "storage")
    data = loras[0][1].read_bytes()  # the kohya file
    sha = hashlib.sha256(data).hexdigest()
    storage.put_bytes("models/local/blobs/lora", data)
    base = ModelEntry(id="demo-base", family="ddpm", path="demo-base")

    def record(ref: str, kind: str, sha256: str = sha) -> UploadedModel:
        return UploadedModel(id=ref, sha256=sha256, kind=kind, family="ddpm",
                             finetuned_from="demo-base", size_bytes=len(data),
                             created_at=datetime.now(UTC), blob_key="models/local/blobs/lora")

    uploads = {"up-lora": record("up-lora", "lora"), "up-unet": record("up-unet", "unet"),
               "up-bad": record("up-bad", "lora", "0" * 64)}
    resolver = SimpleNamespace(check_pair=lambda pre, ft: (base, uploads[ft]))
    disk = DiskCache(tmp_path / "cache", 10**8)
    from worker.model_cache import ModelCache

    ctx = SimpleNamespace(settings=SimpleNamespace(device="cpu", dtype=None), disk=disk,
                          store=SimpleNamespace(storage=storage),
                          cache=ModelCache(10**9, lambda key: None))
    fallback_calls = []

    def fallback(model):
        fallback_calls.append(model.finetuned)
        return load_pair("demo-base", "demo-vangogh")

    loader = swapping_loader(ctx, resolver, fallback)
    with loader.open(AuditModel("demo-base", "up-lora")) as pair:
        assert isinstance(pair, DDPMLoraPair) and pair.unet_pretrained is pair.unet_finetuned
        assert sha in disk._pins  # the file stays while the model is attached
        x, t = _probe()
        with torch.no_grad():
            swapped = pair.eps_finetuned(x, t, pair.conditioning(None))
    assert sha not in disk._pins and disk.blob_path(sha).is_file()
    with torch.no_grad():
        fresh = load_pair("demo-base", str(loras[0][1]))
        assert torch.equal(swapped, fresh.eps_finetuned(x, t, fresh.conditioning(None)))
    for ref in ("up-unet", "up-bad"):
        with loader.open(AuditModel("demo-base", ref)):
            pass
    assert fallback_calls == ["up-unet", "up-bad"] and not disk._pins
    assert (loader.stats.swaps, loader.stats.fallback_loads) == (1, 2)
    # a job (or the fallback) loads the same upload through the pair cache's loader
    from worker.context import UPLOAD, _load_pair

    ctx.sources = {sha: ("models/local/blobs/lora", len(data))}
    pair = _load_pair((UPLOAD, "demo-base", str(resolve_model_reference("demo-base")), sha,
                       "lora"), ctx)
    assert isinstance(pair, DDPMLoraPair) and sha in disk._pins  # until the cache evicts it
    with torch.no_grad():
        assert torch.equal(pair.eps_finetuned(x, t, pair.conditioning(None)), swapped)
