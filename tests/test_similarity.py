import pytest
import torch

from cgidm_core.errors import ConfigError
from cgidm_core.masks import checkerboard_mask
from cgidm_core.similarity import (
    FeatureModel,
    compute_metrics,
    masked_mse,
    masked_psnr,
    masked_ssim,
    score_from_metric,
)


@pytest.fixture
def pictures():
    gen = torch.Generator().manual_seed(0)
    low = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    original = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear")
    keep = checkerboard_mask((3, 32, 32), 4)
    return original, keep


def test_identical_images_are_perfectly_similar(pictures):
    original, keep = pictures
    assert torch.allclose(masked_mse(original, original, keep), torch.zeros(2))
    assert torch.allclose(masked_ssim(original, original, keep), torch.ones(2), atol=1e-5)
    assert (masked_psnr(original, original, keep) > 90).all()


def test_only_the_recovered_region_counts(pictures):
    original, keep = pictures
    changed_kept_half = original + keep * 0.5
    assert torch.allclose(masked_mse(original, changed_kept_half, keep), torch.zeros(2))
    changed_free_half = original + (1 - keep) * 0.5
    assert (masked_mse(original, changed_free_half, keep) > 0.05).all()


def test_metrics_rank_a_closer_recovery_higher(pictures):
    original, keep = pictures
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(original.shape, generator=gen)
    near, far = original + 0.05 * noise, original + 0.5 * noise
    near_m = compute_metrics(original, near, keep, ["ssim", "psnr", "mse"])
    far_m = compute_metrics(original, far, keep, ["ssim", "psnr", "mse"])
    for name in ("ssim", "psnr", "mse"):
        for i in range(2):
            near_score = score_from_metric(name, near_m[name][i])
            assert near_score > score_from_metric(name, far_m[name][i])


def test_unknown_metric_and_missing_feature_model_are_clear_errors(pictures):
    original, keep = pictures
    with pytest.raises(ConfigError, match="unknown metric"):
        compute_metrics(original, original, keep, ["lpips"])
    with pytest.raises(ConfigError, match="feature model"):
        compute_metrics(original, original, keep, ["clip"])


def _tiny_clip(path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=8,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(path, safe_serialization=True)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor.save_pretrained(path)
    return path


def _tiny_dino(path, image_size=32):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=5, num_attention_heads=2,
        image_size=image_size, patch_size=8,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(path, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.mark.parametrize("builder,kind", [(_tiny_clip, "clip"), (_tiny_dino, "vit")])
def test_feature_similarity_from_a_local_folder(tmp_path, pictures, builder, kind):
    original, keep = pictures
    model = FeatureModel(builder(tmp_path / kind))
    assert model.kind == kind
    same = model.cosine(original, original)
    assert torch.allclose(same, torch.ones(2), atol=1e-5)
    other = model.cosine(original, original.flip(0))
    assert (other < 0.9999).all()
    metric = "clip" if kind == "clip" else "dino"
    values = compute_metrics(original, original, keep, [metric], feature_model=model)
    assert values[metric] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_feature_model_must_exist_offline(tmp_path):
    from cgidm_core.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        FeatureModel(tmp_path / "nope")
