"""The packaged demo pair, demo-name resolution, ``cgidm models`` and the training loop."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image
from sklearn.metrics import roc_auc_score

from cgidm.cli import main
from cgidm_core import training
from cgidm_core.demo import (
    DEMO_MODELS_DIR,
    demo_model_path,
    list_demo_models,
    resolve_model_reference,
)
from cgidm_core.errors import ImageInputError, ModelNotFoundError
from cgidm_core.names import DEMO_FAMILIES, DEMO_MODELS
from tests.paths import REPO_ROOT, SHARED_DATA, require_shared_data

VANGOGH = SHARED_DATA / "wikiart-vangogh"


@pytest.fixture
def vangogh() -> None:
    """The Van Gogh paintings of ../shared/data: missing, the test fails with a message."""
    for split in ("membership", "hold_out"):
        require_shared_data("wikiart-vangogh", split)


needs_vangogh = pytest.mark.usefixtures("vangogh")


@pytest.fixture(scope="module")
def demo_parts() -> dict[str, tuple[UNet2DModel, DDPMScheduler]]:
    return {name: training.load_pipeline_parts(demo_model_path(name)) for name in PIXEL_MODELS}


FINETUNES = ("demo-vangogh", "demo-vangogh-light")
#: The flow-matching demo pair (tests/test_flow.py covers its method).
FLOW_MODELS = ("demo-flow-base", "demo-flow-vangogh")
DDPM_MODELS = ("demo-base", *FINETUNES)
#: The latent, text-conditioned family (tests/test_latent_family.py covers it).
LATENT_MODELS = ("demo-latent-base", "demo-latent-vangogh-lora")
PIXEL_MODELS = (*DDPM_MODELS, *FLOW_MODELS)


def test_every_demo_model_is_a_complete_safetensors_pipeline():
    assert set(DEMO_MODELS) == {*DDPM_MODELS, *FLOW_MODELS, *LATENT_MODELS}
    for name in PIXEL_MODELS:
        folder = demo_model_path(name)
        assert folder == DEMO_MODELS_DIR / name
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "DDPMPipeline"
        assert (folder / "unet" / "config.json").is_file()
        assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert (folder / "scheduler" / "scheduler_config.json").is_file()
        assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt*"))


def test_demo_models_fit_the_size_budget():
    def size(names: tuple[str, ...]) -> int:
        return sum(p.stat().st_size for name in names
                   for p in (DEMO_MODELS_DIR / name).rglob("*") if p.is_file())

    assert size(DDPM_MODELS) <= 20 * 1024 * 1024
    assert size(FLOW_MODELS) <= 10 * 1000 * 1000  # the flow pair's allowance (issue 12)
    assert {p.name for p in DEMO_MODELS_DIR.iterdir() if p.is_dir()} <= set(DEMO_MODELS)


def test_model_cards_state_data_settings_and_results():
    for name in PIXEL_MODELS:
        card = (demo_model_path(name) / "README.md").read_text()
        for fact in ("Data", "steps", "seed", "final", "Training time", "Command", "32x32"):
            assert fact in card, f"{name} model card lacks {fact!r}"
    assert "skimage.data" in (demo_model_path("demo-base") / "README.md").read_text()
    for name in (*FINETUNES, "demo-flow-vangogh"):
        card = (demo_model_path(name) / "README.md").read_text()
        assert "wikiart-vangogh/membership" in card
        assert "ROC AUC" in card
    flow_base = (demo_model_path("demo-flow-base") / "README.md").read_text()
    assert "FlowMatchEulerDiscreteScheduler" in flow_base and "demo-base" in flow_base


def test_light_fine_tune_is_the_same_recipe_stopped_early():
    """Only the number of steps differs, so the two fine-tunes isolate the dose of fine-tuning."""
    full, light = (json.loads((demo_model_path(n) / "training.json").read_text())
                   for n in FINETUNES)
    assert light["steps"] * 3 <= full["steps"]
    for key in ("base", "member_files", "batch_size", "learning_rate", "seed"):
        assert light[key] == full[key], key
    assert f"{light['steps']} steps" in DEMO_MODELS["demo-vangogh-light"]


def test_demo_models_load_as_unet_and_ddpm_scheduler(demo_parts):
    base = demo_parts["demo-base"][0]
    for name in DDPM_MODELS:
        unet, scheduler = demo_parts[name]
        assert isinstance(unet, UNet2DModel) and isinstance(scheduler, DDPMScheduler)
        assert unet.config.sample_size == training.DEMO_IMAGE_SIZE
        assert scheduler.config.num_train_timesteps == 1000
        assert scheduler.config.prediction_type == "epsilon"
    def architecture(unet: UNet2DModel) -> dict:
        return {k: v for k, v in unet.config.items() if not k.startswith("_")}

    x = torch.zeros(1, 3, 32, 32)
    for name in FINETUNES:
        tuned = demo_parts[name][0]
        assert architecture(base) == architecture(tuned)
        # A real fine-tune: every weight was free to move and many did.
        changed = [not torch.equal(a, b) for a, b in zip(base.parameters(), tuned.parameters(),
                                                           strict=True)]
        assert sum(changed) > 0.9 * len(changed), name
        with torch.no_grad():
            assert torch.isfinite(tuned(x, torch.tensor([500])).sample).all()


def test_demo_names_work_in_load_pair():
    from cgidm_core.api import load_pair

    for name in FINETUNES:
        pair = load_pair("demo-base", name, device="cpu")
        assert pair.family == "ddpm"
        assert pair.image_size == 32
        assert pair.latent_shape == (3, 32, 32)


def test_resolve_model_reference(tmp_path):
    for name in DEMO_MODELS:
        assert resolve_model_reference(name) == DEMO_MODELS_DIR / name
    assert resolve_model_reference(tmp_path) == tmp_path
    assert resolve_model_reference(str(tmp_path)) == tmp_path
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_reference("demo-monet")
    assert "demo-base" in str(err.value) and "demo-vangogh" in str(err.value)
    with pytest.raises(ModelNotFoundError):
        resolve_model_reference(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError):
        demo_model_path("demo-monet")


def test_list_demo_models_records():
    records = {r["name"]: r for r in list_demo_models()}
    assert records["demo-base"]["finetuned_from"] is None
    for name in FINETUNES:
        assert records[name]["finetuned_from"] == "demo-base"
    assert records["demo-flow-vangogh"]["finetuned_from"] == "demo-flow-base"
    assert records["demo-latent-vangogh-lora"]["finetuned_from"] == "demo-latent-base"
    for record in records.values():
        family = ("pixel-flow" if record["name"] in FLOW_MODELS else
                  "stable-diffusion" if record["name"] in LATENT_MODELS else "ddpm")
        assert record["family"] == family == DEMO_FAMILIES[record["name"]]
        assert (DEMO_MODELS_DIR / record["name"]).samefile(record["path"])


def test_cgidm_models_lists_names_and_paths(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in DEMO_MODELS:
        assert name in out
        assert str(DEMO_MODELS_DIR / name) in out
    assert "fine-tuned from demo-base" in out
    assert "demo-flow-vangogh pixel-flow, fine-tuned from demo-flow-base" in [
        " ".join(line.split()) for line in out.splitlines()]
    assert main(["models", "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == set(DEMO_MODELS)


def test_service_registry_offers_every_demo_pair():
    """Without a registry file the service serves the packaged demo models, by their names."""
    from cgidm.registry import load_registry

    registry = load_registry(None)
    assert all(entry.path == entry.id for entry in registry.entries.values())
    for name in FINETUNES:
        registry.check_pair("demo-base", name)
    registry.check_pair("demo-flow-base", "demo-flow-vangogh")
    registry.check_pair("demo-latent-base", "demo-latent-vangogh-lora")
    assert {e.id: e.family for e in registry.entries.values()} == DEMO_FAMILIES


def test_cgidm_reports_an_unknown_demo_name_in_one_line(capsys, tmp_path):
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    code = main(["check", "--pretrained", "demo-base", "--finetuned", "demo-monet",
                 "--out", str(tmp_path / "out"), str(image)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "demo-monet" in err and "demo-vangogh" in err and "\n" not in err


@needs_vangogh
@pytest.mark.slow  # denoising losses over 20 paintings: ~9 s
def test_fine_tune_memorised_its_members(demo_parts):
    """Members lose more denoising loss under the fine-tune than hold-outs of the same artist."""
    (base, scheduler), (tuned, _) = demo_parts["demo-base"], demo_parts["demo-vangogh"]
    diffs = []
    for split in ("membership", "hold_out"):
        _, images = training.load_images_as_tensor(VANGOGH / split, 32)
        ft = training.denoising_losses(tuned, scheduler, images, samples=12, seed=7)
        pre = training.denoising_losses(base, scheduler, images, samples=12, seed=7)
        diffs.append(ft - pre)
    labels = [1] * len(diffs[0]) + [0] * len(diffs[1])
    assert roc_auc_score(labels, (-torch.cat(diffs)).numpy()) >= 0.9


@needs_vangogh
@pytest.mark.slow  # denoising losses of three models: ~5 s
def test_light_fine_tune_moved_its_members_less(demo_parts):
    """The light fine-tune learnt its members, but less: the hard case the benchmark needs."""
    base, scheduler = demo_parts["demo-base"]
    _, members = training.load_images_as_tensor(VANGOGH / "membership", 32)
    before = training.denoising_losses(base, scheduler, members, samples=8, seed=7)
    gain = {  # measured: about 0.034 (demo-vangogh) and 0.012 (demo-vangogh-light)
        name: float((before - training.denoising_losses(demo_parts[name][0], scheduler, members,
                                                        samples=8, seed=7)).mean())
        for name in FINETUNES
    }
    assert 0 < gain["demo-vangogh-light"] < gain["demo-vangogh"] / 2, gain


def test_denoising_losses_use_common_random_numbers(demo_parts):
    unet, scheduler = demo_parts["demo-base"]
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    a = training.denoising_losses(unet, scheduler, images, samples=4, seed=3, batch_size=5)
    b = training.denoising_losses(unet, scheduler, images, samples=4, seed=3, batch_size=64)
    c = training.denoising_losses(unet, scheduler, images, samples=4, seed=4)
    assert a.shape == (3,)
    assert torch.allclose(a, b, atol=1e-6)  # same draws whatever the batching
    assert not torch.allclose(a, c)  # the seed picks the draws


@needs_vangogh
def test_training_loop_writes_a_loadable_pipeline(tmp_path):
    folder = tmp_path / "members"
    folder.mkdir()
    for path in sorted((VANGOGH / "membership").glob("*.jpg"))[:2]:
        shutil.copy(path, folder / path.name)
    names, images = training.load_images_as_tensor(folder, 32)
    assert len(names) == 2 and images.shape == (2, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1

    unet, scheduler = training.build_demo_unet(), training.build_demo_scheduler()
    config = training.TrainConfig(steps=3, batch_size=2, learning_rate=1e-4, seed=0)
    losses = training.train(unet, scheduler, training.FixedImages(images, seed=0), config,
                            progress=False)
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)

    out = training.save_pipeline(unet, scheduler, tmp_path / "model")
    pipe = DDPMPipeline.from_pretrained(out, use_safetensors=True)
    for saved, trained in zip(pipe.unet.parameters(), unet.parameters(), strict=True):
        assert torch.equal(saved, trained)


def test_training_is_reproducible_for_a_seed():
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    initial = training.build_demo_unet().state_dict()
    config = training.TrainConfig(steps=2, batch_size=2, learning_rate=1e-3, seed=5)
    histories = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # the caller's global RNG state must not matter
        unet = training.build_demo_unet()
        unet.load_state_dict(initial)
        data = training.FixedImages(images, seed=5, flip=True)
        histories.append(training.train(unet, training.build_demo_scheduler(), data, config,
                                        progress=False))
    assert histories[0] == histories[1]


def test_random_crops_are_seeded_and_in_range():
    photos = [p for _, p in training.sample_photos()[:3]]
    first = training.RandomCrops(photos, 32, seed=1)(4)
    again = training.RandomCrops(photos, 32, seed=1)(4)
    other = training.RandomCrops(photos, 32, seed=2)(4)
    assert first.shape == (4, 3, 32, 32)
    assert first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_sample_photos_ship_with_installed_packages():
    photos = training.sample_photos()
    assert len(photos) >= 20
    assert all(p.mode == "RGB" and min(p.size) >= 64 for _, p in photos)
    assert any(name.startswith("matplotlib:") for name, _ in photos)


def test_fixed_images_cover_every_image_each_epoch():
    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    data = training.FixedImages(images, seed=0)
    epoch = torch.cat([data(2), data(3)])[:, 0, 0, 0]
    assert sorted(epoch.tolist()) == [0, 1, 2, 3, 4]


def test_image_folder_errors_are_specific(tmp_path):
    with pytest.raises(ImageInputError):
        training.load_images_as_tensor(tmp_path / "missing", 32)
    with pytest.raises(ImageInputError, match="no images"):
        training.load_images_as_tensor(tmp_path, 32)


@needs_vangogh
def test_script_fine_tunes_the_demo_base_on_any_folder(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "train_demo_pair", REPO_ROOT / "scripts" / "train_demo_pair.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    members = tmp_path / "members"
    members.mkdir()
    for path in sorted((VANGOGH / "hold_out").glob("*.jpg"))[:2]:
        shutil.copy(path, members / path.name)
    out = tmp_path / "mine"
    assert script.main(["finetune", "--members", str(members), "--out", str(out),
                        "--steps", "2", "--seed", "1"]) == 0
    unet, scheduler = training.load_pipeline_parts(out)
    assert unet.config.sample_size == 32
    card = (out / "README.md").read_text()
    assert "2 steps" in card and "seed 1" in card and "demo-base" in card
    facts = json.loads((out / "training.json").read_text())
    assert facts["steps"] == 2 and math.isfinite(facts["final_loss"])
    capsys.readouterr()
