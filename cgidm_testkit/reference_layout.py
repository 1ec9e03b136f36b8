"""The authors' layout and loop (Revelio ``Extractor.py``, ``sdm_utils.py``, ``PGD.py``),
re-created for measurement only. Nothing in cgidm uses this module.

What is kept from the reference because it is what makes it slow or big (METHOD.md, "Known
weaknesses"); each point was checked against the authors' code and the libraries it calls:
- two complete pipelines: the fine-tuned one (its UNet and text encoder, the base's VAE and
  tokenizer, no safety checker) and the pretrained one as ``from_pretrained`` gives it (its own
  VAE, text encoder, tokenizer and, for real SD checkpoints, the safety checker);
- networks NOT frozen: neither diffusers' nor transformers' ``from_pretrained`` touches
  ``requires_grad`` and ``Extractor.py`` never does, so every backward pass also computes (and
  accumulates: only ``delta.grad`` is ever zeroed) weight gradients of both UNets;
- the prompt embeddings come from ``pipe._encode_prompt`` outside any ``no_grad`` (only the
  pipelines' ``__call__`` is decorated), so they carry the text encoders' graph and each
  ``loss.backward(retain_graph=True)`` also runs back through both text encoders, making their
  weight gradients too;
- one image at a time, one Monte Carlo sample per step, one ``t`` shared by both models but an
  independent noise draw for each model;
- the VAE latent is *sampled* (``latent_dist.sample()``), the partial image is decoded to 8-bit
  pixels (``numpy_to_pil``) and re-encoded, again sampled;
- that re-encoding runs outside ``no_grad``, so the latent the script holds keeps the VAE
  encoder's graph (its saved activations stay in memory for the whole loop), BUT the PGD does not
  backpropagate into it: advertorch's ``perturb`` starts with ``replicate_input``
  (``x.detach().clone()``), so the gradient stops at the latent. (Until 2026-11-30 this file
  backpropagated through the VAE encoder at every step, more work than the authors' loop does;
  every ratio against an SD reference measured before then is flattering to cgidm.)
- the L2 PGD of advertorch as modified in ``PGD.py``: step ``alpha * g / ||g||`` (no small
  constant), the whole normalised gradient zeroed when it holds a NaN, clamp to [-100, 100],
  project onto the ``epsilon`` ball (whole tensor, norm clamped at 1e-4); ``loss.backward`` with
  ``retain_graph=True``, so the previous step's graph is still alive while the next is built.

What is deliberately made equal to cgidm so that speed and AUC compare like with like: the
image preprocessing (``images.to_tensor``), the checkerboard geometry (``masks.default_cell``),
``alpha``/``epsilon`` scaled to the latent size exactly as ``InversionConfig`` scales them (the
reference's 2.0/70.0 are stated for a 4x64x64 latent), the similarity metric (``compute_metrics``
on the float recovery; the authors score the saved 8-bit PNG with CLIP/DINO), the dtype (the
pair's; the authors run float16 on a GPU) and seeds (the reference has none; here each image
seeds Python's and torch's global generators, so runs repeat). The reference's per-image
diagnostic pass (10 timesteps x 2 models, no gradient) is skipped by default
(``diagnostics=True`` adds it); leaving it out only makes the reference look faster.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cgidm_core.inversion import InversionConfig, scaled_radius
from cgidm_core.masks import checkerboard_mask, default_cell, upsample_mask

#: PGD clamp of the reference (``clip_min, clip_max = -100.0, 100.0``).
CLIP_RANGE = (-100.0, 100.0)


@dataclass
class ReferencePipeline:
    """One complete pipeline as the reference holds it: its own copy of every component."""

    unet: Any
    scheduler: Any
    vae: Any = None  # None: pixel-space model (encode/decode are the identity)
    text_encoder: Any = None
    tokenizer: Any = None
    safety_checker: Any = None
    pipeline: Any = None  # the diffusers pipeline object that owns the above

    def modules(self) -> list[torch.nn.Module]:
        parts = (self.unet, self.vae, self.text_encoder, self.safety_checker)
        return [m for m in parts if isinstance(m, torch.nn.Module)]


@dataclass
class ReferenceLayout:
    finetuned: ReferencePipeline
    pretrained: ReferencePipeline
    family: str  # "ddpm" or "stable-diffusion"

    @property
    def image_size(self) -> int:
        size = self.finetuned.unet.config.sample_size
        size = int(size if isinstance(size, int) else size[0])
        if self.finetuned.vae is None:
            return size
        return size * 2 ** (len(self.finetuned.vae.config.block_out_channels) - 1)

    def parameter_bytes(self) -> int:
        """Bytes of every parameter and buffer held by both pipelines (shared tensors once)."""
        seen: set[int] = set()
        total = 0
        for pipe in (self.finetuned, self.pretrained):
            for module in pipe.modules():
                for tensor in list(module.parameters()) + list(module.buffers()):
                    key = tensor.untyped_storage().data_ptr()
                    if key not in seen:
                        seen.add(key)
                        total += tensor.untyped_storage().nbytes()
        return total


# -- building the layout -----------------------------------------------------------------------


def load_reference_layout(
    pretrained: Path, finetuned: Path, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> ReferenceLayout:
    """Load two pipelines from disk the way ``Extractor.py`` does (no freezing, no sharing)."""
    import json

    index = json.loads((Path(pretrained) / "model_index.json").read_text())
    if index.get("_class_name") in ("DDPMPipeline", "DDIMPipeline"):
        from diffusers import DDPMPipeline

        pipes = []
        for folder in (finetuned, pretrained):
            pipe = DDPMPipeline.from_pretrained(folder, use_safetensors=True, torch_dtype=dtype)
            pipe.to(device)
            pipes.append(ReferencePipeline(unet=pipe.unet, scheduler=pipe.scheduler,
                                           pipeline=pipe))
        return ReferenceLayout(finetuned=pipes[0], pretrained=pipes[1], family="ddpm")

    from diffusers import StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    finetuned = Path(finetuned)
    unet = UNet2DConditionModel.from_pretrained(finetuned, subfolder="unet", torch_dtype=dtype)
    extra: dict[str, Any] = {"unet": unet.to(device)}
    if (finetuned / "text_encoder").is_dir():
        encoder = CLIPTextModel.from_pretrained(finetuned, subfolder="text_encoder", dtype=dtype)
        extra["text_encoder"] = encoder.to(device)
    ft = StableDiffusionImg2ImgPipeline.from_pretrained(
        pretrained, safety_checker=None, torch_dtype=dtype, **extra
    ).to(device)
    pre = StableDiffusionImg2ImgPipeline.from_pretrained(pretrained, torch_dtype=dtype).to(device)
    return ReferenceLayout(
        finetuned=_sd_parts(ft), pretrained=_sd_parts(pre), family="stable-diffusion"
    )


def _sd_parts(pipe: Any) -> ReferencePipeline:
    return ReferencePipeline(
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        safety_checker=getattr(pipe, "safety_checker", None),
        pipeline=pipe,
    )


def build_sd15_reference_layout(
    with_safety_checker: bool = True, device: str = "cpu"
) -> ReferenceLayout:
    """The reference layout for SD 1.5 in memory, random weights (``full_size/sd15.py``).

    The fine-tuned pipeline is a full DreamBooth fine-tune (own UNet and text encoder), the
    paper's setting. ``with_safety_checker`` reproduces ``from_pretrained`` of the pretrained
    pipeline, which loads SD's safety checker; without it the layout is "two pipelines of UNet +
    VAE + text encoder + tokenizer". ``device`` builds the weights there directly (a GPU
    initialises 2.4 G random parameters in seconds; a CPU takes about a minute).
    """
    from diffusers import StableDiffusionImg2ImgPipeline
    from transformers import CLIPImageProcessor

    from cgidm_testkit.full_size import sd15

    def pipeline(seed: int, safety: bool) -> Any:
        tokenizer = sd15.build_tokenizer()
        return StableDiffusionImg2ImgPipeline(
            vae=sd15.build_vae(seed + 1, device=device),
            text_encoder=sd15.build_text_encoder(tokenizer, seed + 2, device=device),
            tokenizer=tokenizer,
            unet=sd15.build_unet(seed, device=device),
            scheduler=sd15.build_scheduler(),
            safety_checker=(sd15.build_safety_checker(seed + 3, device=device)
                            if safety else None),
            feature_extractor=CLIPImageProcessor() if safety else None,
            requires_safety_checker=False,
        )

    ft = pipeline(10, safety=False)
    pre = pipeline(0, safety=with_safety_checker)
    return ReferenceLayout(
        finetuned=_sd_parts(ft), pretrained=_sd_parts(pre), family="stable-diffusion"
    )


# -- the reference loop ------------------------------------------------------------------------


def _alphas_cumprod(scheduler: Any, device: torch.device) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)


def _encode_sampled(pipe: ReferencePipeline, x: torch.Tensor) -> torch.Tensor:
    """``vae.encode(x).latent_dist.sample() * scaling_factor``; identity for pixel models."""
    if pipe.vae is None:
        return x
    sample = pipe.vae.encode(x.to(pipe.vae.dtype)).latent_dist.sample()
    return sample * pipe.vae.config.scaling_factor


def _decode(pipe: ReferencePipeline, z: torch.Tensor) -> torch.Tensor:
    if pipe.vae is None:
        return z.clamp(-1, 1)
    image = pipe.vae.decode(z.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return image.float().clamp(-1, 1)


def _to_8bit_and_back(image: torch.Tensor) -> torch.Tensor:
    """``numpy_to_pil`` then ``preprocess``: the partial image passes through 8-bit pixels."""
    unit = ((image.detach().float().cpu() + 1) / 2).clamp(0, 1)
    array = (unit.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    back = torch.from_numpy(array.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return (2.0 * back - 1.0).to(image.device)


def _prompt_embeds(pipe: ReferencePipeline, prompt: str, device: torch.device) -> torch.Tensor:
    """``pipe.encode_prompt`` without ``no_grad``: the embedding keeps its graph, as there."""
    tokens = pipe.tokenizer(
        prompt,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return pipe.text_encoder(tokens.input_ids.to(device))[0]


def _denoising_loss(
    pipe: ReferencePipeline,
    latents: torch.Tensor,
    t: int,
    prompt_embeds: torch.Tensor | None,
    alphas: torch.Tensor,
) -> torch.Tensor:
    """``attack_model.forward_test``: a fresh noise draw per call, MSE of the prediction."""
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    abar = alphas[t]
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    dtype = pipe.unet.dtype
    if prompt_embeds is None:
        pred = pipe.unet(noisy.to(dtype), t).sample
    else:
        pred = pipe.unet(noisy.to(dtype), t, encoder_hidden_states=prompt_embeds).sample
    return torch.nn.functional.mse_loss(pred.float(), noise.float())


def reference_recover(
    layout: ReferenceLayout,
    image: torch.Tensor,
    *,
    steps: int,
    seed: int,
    prompt: str = "sks style",
    alpha: float | None = None,
    epsilon: float | None = None,
    diagnostics: bool = False,
) -> dict[str, torch.Tensor]:
    """Recover one image ``(1, 3, S, S)`` in [-1, 1] the reference's way.

    Returns ``original``, ``recovered`` (float images on the CPU) and ``mask`` (pixel space,
    1 = kept). ``alpha``/``epsilon`` default to the reference's 2.0/70.0 scaled to this latent.
    """
    if image.shape[0] != 1:
        raise ValueError("the reference processes one image at a time")
    ft, pre = layout.finetuned, layout.pretrained
    device = ft.unet.device
    random.seed(seed)
    torch.manual_seed(seed)
    alphas = _alphas_cumprod(ft.scheduler, device)
    x = image.to(device)

    with torch.no_grad():
        ori_latents = _encode_sampled(ft, x).float()
        latent_shape = tuple(ori_latents.shape[1:])
        pixels = 1 if ft.vae is None else 2 ** (len(ft.vae.config.block_out_channels) - 1)
        keep = checkerboard_mask(latent_shape, default_cell(latent_shape, pixels)).to(device)
        partial = _to_8bit_and_back(_decode(ft, ori_latents * keep))
    # Outside no_grad, as in Extractor.py: with a VAE this latent carries the encoder's graph,
    # which stays referenced (memory) for the whole loop ...
    latents = _encode_sampled(ft, partial).float()
    # ... but advertorch's perturb() detaches its input (replicate_input): the PGD works on a
    # copy without history, so no backward pass reaches the VAE encoder.
    xvar = latents.detach().clone()

    conditional = ft.text_encoder is not None
    embeds_ft = _prompt_embeds(ft, prompt, device) if conditional else None
    embeds_pre = _prompt_embeds(pre, prompt, device) if conditional else None

    if alpha is None or epsilon is None:
        free = int((1 - keep).sum().item()) * latent_shape[0]
        scaled_alpha, scaled_eps = scaled_radius(InversionConfig.reference(), free)
        alpha = scaled_alpha if alpha is None else alpha
        epsilon = scaled_eps if epsilon is None else epsilon

    if diagnostics:
        with torch.no_grad():
            fixed = torch.randn(xvar.shape, device=device)
            for i in range(10):
                t = i * 100 + 1
                for pipe, emb in ((ft, embeds_ft), (pre, embeds_pre)):
                    abar = alphas[t]
                    noisy = abar.sqrt() * xvar + (1 - abar).sqrt() * fixed
                    kwargs = {} if emb is None else {"encoder_hidden_states": emb}
                    pipe.unet(noisy.to(pipe.unet.dtype), t, **kwargs)

    def contrast(src_latents: torch.Tensor) -> torch.Tensor:
        """``attack_noise_model.forward``: one t for both models, their own noise each."""
        z = ori_latents * keep + src_latents * (1 - keep)
        t = random.randint(1, 999)
        loss1 = _denoising_loss(ft, z, t, embeds_ft, alphas)
        loss2 = _denoising_loss(pre, z, t, embeds_pre, alphas)
        return loss1 - loss2

    # advertorch perturb_iterative, ord=2, targeted (minimise), rand_init=False
    delta = torch.nn.Parameter(torch.zeros_like(xvar))
    for _ in range(steps):
        loss = -contrast(xvar + delta)
        loss.backward(retain_graph=True)
        grad = delta.grad.data
        grad = grad / torch.norm(grad)
        if torch.isnan(grad).any():
            grad = torch.zeros_like(grad)
        delta.data = delta.data + alpha * grad
        delta.data = (xvar + delta.data).clamp(*CLIP_RANGE) - xvar
        norm = delta.data.abs().pow(2).reshape(1, -1).sum(dim=1).pow(0.5).clamp(min=1e-4)
        delta.data = delta.data * torch.min(epsilon / norm, torch.ones_like(norm))
        delta.grad.data.zero_()

    with torch.no_grad():
        adv = (xvar + delta).clamp(*CLIP_RANGE)
        attacked = ori_latents * keep + adv * (1 - keep)
        recovered = _decode(ft, attacked)
    del latents  # held until here, as the authors' script holds it
    return {
        "original": image.float().cpu(),
        "recovered": recovered.float().cpu(),
        "mask": upsample_mask(keep, pixels).cpu(),
    }
