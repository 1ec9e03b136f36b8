"""How close a recovery is to its original: higher is always "more similar".

Each image is compared with its OWN recovery (the reference code scored an image by its best
match among all recoveries of a split, which leaks between images). Pixel metrics are measured on
the recovered (masked-out) region only: the kept half is identical by construction and would only
dilute the signal. Feature metrics (CLIP, DINO) embed whole images, as the paper does.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError, ModelFormatError, ModelNotFoundError
from .names import ALL_METRICS, FEATURE_METRICS


def _unit(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() + 1.0) / 2.0).clamp(0, 1)


def _region_mean(values: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    region = region.expand_as(values)
    return (values * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1.0)


def masked_mse(original: Tensor, recovered: Tensor, keep: Tensor) -> Tensor:
    """Mean squared error on the recovered region, images scaled to [0, 1]."""
    return _region_mean((_unit(original) - _unit(recovered)).pow(2), 1.0 - keep)


def masked_psnr(original: Tensor, recovered: Tensor, keep: Tensor) -> Tensor:
    return 10.0 * torch.log10(1.0 / masked_mse(original, recovered, keep).clamp_min(1e-10))


def masked_ssim(original: Tensor, recovered: Tensor, keep: Tensor) -> Tensor:
    """SSIM averaged over the recovered region of torchmetrics' full SSIM map."""
    # Imported here: torchmetrics costs seconds to import and most callers never need SSIM.
    from torchmetrics.functional.image import structural_similarity_index_measure

    size = min(original.shape[-2:])
    kernel = min(11, size if size % 2 else size - 1)
    _, ssim_map = structural_similarity_index_measure(
        _unit(recovered),
        _unit(original),
        data_range=1.0,
        kernel_size=kernel,
        sigma=1.5 * kernel / 11,
        reduction="none",
        return_full_image=True,
    )
    return _region_mean(ssim_map, 1.0 - keep)


#: The DINO evaluation convention the paper's code uses (``dino_distance.py``, after BK-SDM):
#: the CLS tokens of the last four blocks, each after the final layer norm, concatenated.
DINO_LAST_BLOCKS = 4
#: DINO's evaluation resize: 256 then a centre crop of 224, i.e. resize to 8/7 of the input size.
DINO_RESIZE_RATIO = 256 / 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resize_short_side_and_centre_crop(picture: Any, resize: int, crop: int) -> Any:
    """torchvision's ``Resize(resize, BICUBIC)`` + ``CenterCrop(crop)`` on a PIL picture."""
    from PIL import Image

    width, height = picture.size
    if width <= height:
        size = (resize, int(resize * height / width))
    else:
        size = (int(resize * width / height), resize)
    picture = picture.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    width, height = picture.size
    top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
    return picture.crop((left, top, left + crop, top + crop))


class FeatureModel:
    """An image embedding network from a local folder (or a hub id when the network is allowed).

    Embeddings follow the paper's evaluation code (Revelio ``Validator.py``/``dino_distance.py``):

    - CLIP (the paper: ViT-B/32): the projected image embedding, ``encode_image`` of OpenAI's
      package, with the folder's own processor (for the OpenAI checkpoints: shortest side 224,
      bicubic, centre crop 224, CLIP's mean/std, as ``clip.load``'s transform);
    - DINO-style ViTs (the paper: ViT-S/16): the CLS tokens of the last ``dino_last_blocks``
      blocks after the final layer norm, concatenated (1536 values for ViT-S), from a bicubic
      resize to 8/7 of the model's input size and a centre crop to it (256 and 224 for the real
      model), ImageNet mean/std. ``dino_last_blocks=1`` is the plain CLS token.

    Pictures are embedded as 8-bit RGB, as the paper scores saved PNG files. Loading goes through
    transformers with safetensors only and no remote code.
    """

    def __init__(
        self,
        reference: str | Path,
        *,
        allow_network: bool = False,
        device: str = "cpu",
        dino_last_blocks: int = DINO_LAST_BLOCKS,
    ):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        ref = str(reference)
        if not allow_network and not Path(ref).exists():
            raise ModelNotFoundError(
                f"feature model {ref!r} is not a local folder; give a folder with a saved "
                "transformers vision model, or allow network access"
            )
        try:
            kwargs: dict[str, Any] = {
                "local_files_only": not allow_network,
                "trust_remote_code": False,
            }
            config = AutoConfig.from_pretrained(ref, **kwargs)
            self.processor = AutoImageProcessor.from_pretrained(ref, **kwargs)
            if config.model_type in ("clip", "clip_vision_model"):
                from transformers import CLIPVisionModelWithProjection

                self.model = CLIPVisionModelWithProjection.from_pretrained(
                    ref, use_safetensors=True, **kwargs
                )
                self.kind = "clip"
            else:
                self.model = AutoModel.from_pretrained(ref, use_safetensors=True, **kwargs)
                self.kind = config.model_type
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFormatError(f"cannot load feature model {ref!r}: {exc}") from exc
        self.model.eval().requires_grad_(False).to(device)
        self.device = device
        self.reference = ref
        self.dino_last_blocks = dino_last_blocks
        if self.kind != "clip":
            layers = getattr(self.model.config, "num_hidden_layers", None)
            if not 1 <= dino_last_blocks <= (layers or dino_last_blocks):
                raise ConfigError(
                    f"dino_last_blocks={dino_last_blocks} but {ref!r} has {layers} blocks; "
                    "use a value between 1 and the number of blocks"
                )
            size = getattr(self.model.config, "image_size", 224)
            self.crop = int(size if isinstance(size, int) else size[0])
            self.resize = int(round(self.crop * DINO_RESIZE_RATIO))

    def describe(self) -> dict[str, Any]:
        """What the embedding is, for reports that compare with the paper."""
        if self.kind == "clip":
            cfg = self.model.config
            return {"model": self.reference, "kind": "clip",
                    "embedding": f"projected image embedding ({cfg.projection_dim} values)",
                    "patch_size": cfg.patch_size, "preprocessing": "the folder's processor"}
        return {"model": self.reference, "kind": self.kind,
                "embedding": f"CLS tokens of the last {self.dino_last_blocks} blocks after the "
                             "final layer norm, concatenated",
                "preprocessing": f"bicubic resize {self.resize}, centre crop {self.crop}"}

    def _dino_pixels(self, pictures: Sequence[Any]) -> torch.Tensor:
        import numpy as np

        mean = torch.tensor(getattr(self.processor, "image_mean", None) or IMAGENET_MEAN)
        std = torch.tensor(getattr(self.processor, "image_std", None) or IMAGENET_STD)
        arrays = [
            np.asarray(_resize_short_side_and_centre_crop(p, self.resize, self.crop),
                       dtype=np.float32) / 255.0
            for p in pictures
        ]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return (batch - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)

    @torch.inference_mode()
    def embed_pictures(self, pictures: Sequence[Any]) -> torch.Tensor:
        """L2-normalised embeddings ``(N, D)`` of PIL pictures (any size), on the CPU."""
        if self.kind == "clip":
            pixels = self.processor(
                images=[p.convert("RGB") for p in pictures], return_tensors="pt"
            )["pixel_values"].to(self.device)
            features = self.model(pixel_values=pixels).image_embeds
        else:
            pixels = self._dino_pixels(pictures).to(self.device)
            output = self.model(pixel_values=pixels, output_hidden_states=True)
            norm = getattr(self.model, "layernorm", None) or torch.nn.Identity()
            blocks = output.hidden_states[-self.dino_last_blocks:]
            features = torch.cat([norm(h)[:, 0] for h in blocks], dim=-1)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings of a batch in [-1, 1], seen as 8-bit pictures (as the paper's PNGs)."""
        from .images import to_pil

        return self.embed_pictures(to_pil(images))

    def cosine(self, original: torch.Tensor, recovered: torch.Tensor) -> torch.Tensor:
        return (self.embed(original) * self.embed(recovered)).sum(-1)


@lru_cache(maxsize=4)
def load_feature_model(reference: str, allow_network: bool = False) -> FeatureModel:
    """Feature models are reused across calls: loading one costs more than embedding a batch."""
    return FeatureModel(reference, allow_network=allow_network)


def validate_metrics(names: Sequence[str], feature_model: object | None) -> None:
    for name in names:
        if name not in ALL_METRICS:
            raise ConfigError(
                f"unknown metric {name!r}; choose from {', '.join(ALL_METRICS)}"
            )
        if name in FEATURE_METRICS and feature_model is None:
            raise ConfigError(
                f"metric {name!r} needs a feature model: give a local folder holding a "
                f"{name.upper()} vision model (--feature-model)"
            )


def compute_metrics(
    original: torch.Tensor,
    recovered: torch.Tensor,
    keep: torch.Tensor,
    names: Sequence[str],
    feature_model: FeatureModel | str | Path | None = None,
) -> dict[str, list[float]]:
    """Scores per metric, one per image; for ``mse`` the value is the error (lower = closer)."""
    validate_metrics(names, feature_model)
    keep = keep.to(original.device)
    out: dict[str, list[float]] = {}
    for name in names:
        if name == "ssim":
            values = masked_ssim(original, recovered, keep)
        elif name == "psnr":
            values = masked_psnr(original, recovered, keep)
        elif name == "mse":
            values = masked_mse(original, recovered, keep)
        else:
            model = (
                feature_model
                if isinstance(feature_model, FeatureModel)
                else load_feature_model(str(feature_model))
            )
            values = model.cosine(original, recovered)
        out[name] = [float(v) for v in values]
    return out


def score_from_metric(name: str, value: float) -> float:
    """Turn a metric into a membership score where higher means more likely a member."""
    return -value if name == "mse" else value


#: A displacement of the recovery from its start below this RMS per free value (in [-1, 1]
#: units) is decoder noise (~1e-6 between batch sizes), not a move: its direction means nothing.
MOVED_TOLERANCE = 1e-4


def displacement_values(original: torch.Tensor, recovered: torch.Tensor, start: torch.Tensor,
                        keep: torch.Tensor) -> dict[str, list[float]]:
    """Where the PGD went, relative to where it should have gone, per image, over the free
    (recovered) pixels: ``cosine`` = cos(recovered - start, original - start) and ``progress`` =
    <recovered - start, original - start> / ||original - start||^2 (1 = arrived, 0 = no move
    towards the original or none at all).

    Why: the PGD's steps are normalised, so a light fine-tune moves the recovery as far as a
    strong one; what membership changes is the direction. Unlike the recovery's similarity these
    ignore how close the start already was (the image's own "easy to fill in", which failed the
    null controls), and a recovery that never left its start (a fine-tune equal to its base)
    scores exactly 0 for every image. Images are ``(N, 3, H, W)``; ``keep`` is 1 on kept pixels.
    """
    free = (1.0 - keep.double()).expand_as(original)
    moved = ((recovered.double() - start.double()) * free).flatten(1)
    target = ((original.double() - start.double()) * free).flatten(1)
    count = free.flatten(1).sum(1).clamp_min(1.0)
    still = (moved.pow(2).sum(1) / count).sqrt() < MOVED_TOLERANCE
    dot = (moved * target).sum(1)
    norms = (moved.norm(dim=1) * target.norm(dim=1)).clamp_min(1e-12)
    cosine = torch.where(still, torch.zeros_like(dot), dot / norms)
    progress = torch.where(still, torch.zeros_like(dot),
                           dot / target.pow(2).sum(1).clamp_min(1e-12))
    return {"cosine": [round(float(v), 4) for v in cosine],
            "progress": [round(float(v), 4) for v in progress]}
