"""The one interface the algorithm sees: a pretrained/fine-tuned model pair.

CGI-DM needs, for both models, the noise prediction at a noised latent, plus the shared pieces
(encoder/decoder, the noise schedule, the conditioning). Keeping this interface small means a new
model family is one new adapter in ``cgidm_core.models`` and never a change to the inversion.

Conventions every adapter follows:
- images are float32 tensors ``(N, 3, S, S)`` in ``[-1, 1]``;
- ``encode`` is deterministic (the VAE's latent *mean*, times the scaling factor), so that results
  are reproducible; pixel-space models encode with the identity. ``encode_sampled`` draws from
  the posterior with the caller's per-image generators instead (the reference preset);
- ``eps_finetuned``/``eps_pretrained`` take a float32 latent batch and integer timesteps ``(N,)``
  and return float32 predictions of the same shape (adapters cast to their compute dtype inside),
  in the space of :meth:`ModelPair.loss_target`: the noise for DDPM-style families, the velocity
  ``noise - x0`` for flow-matching families (which override :meth:`ModelPair.add_noise` and
  :meth:`ModelPair.loss_target`);
- conditioning is computed once per prompt and cached by the adapter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Conditioning:
    """Per-model conditioning for one prompt (``None`` for unconditional models).

    Each field is a batch-1 tensor that adapters expand to the batch they are given.
    """

    finetuned: Any = None
    pretrained: Any = None


class ModelPair(ABC):
    """A pretrained model and its suspected fine-tune, sharing codec, schedule and tokenizer."""

    #: Family name shown to users: "stable-diffusion", "ddpm", ...
    family: str = "unknown"
    #: Pixel side length the pair works at (images are resized and centre-cropped to it).
    image_size: int
    #: Latent tensor shape ``(C, H, W)`` for one image.
    latent_shape: tuple[int, int, int]
    #: Pixels per latent cell along one side (8 for Stable Diffusion, 1 for pixel models).
    pixels_per_latent: int
    #: Device and compute dtype of the networks.
    device: torch.device
    dtype: torch.dtype
    #: Cumulative product of alphas of the training noise schedule, float32 on ``device``;
    #: ``None`` for flow-matching families (``cgidm_core.models.flow``), which have no alphas.
    alphas_cumprod: torch.Tensor | None
    #: Prompt used when the caller gives none (the instance prompt of the fine-tune, if known).
    default_prompt: str | None = None
    #: Where ``default_prompt`` was found (``prompts.PROMPT_SOURCES``) and in which file/key;
    #: the loader reads the fine-tune's own metadata (``prompts.finetune_prompt``).
    default_prompt_source: str | None = None
    default_prompt_origin: str | None = None
    #: Whether the models take a text prompt at all (pixel DDPMs do not).
    conditional: bool = True
    #: Valid value range of a latent entry, when the space has one (pixels live in [-1, 1]): the
    #: inversion keeps its recovery inside it. ``None`` for unbounded latents (SD's VAE space).
    latent_bounds: tuple[float, float] | None = None
    #: Images per PGD batch when the caller does not say: small pixel models run a whole set
    #: at once; latent models are bounded by accelerator memory.
    preferred_batch_size: int = 8
    #: What each network predicts ("epsilon", "v_prediction", "sample"); the fine-tune may
    #: differ from its base, e.g. a v-prediction fine-tune of an epsilon model.
    prediction_type: str
    prediction_type_finetuned: str
    #: Format the fine-tune was loaded from ("dreambooth", "lora", "ddpm", ...).
    finetuned_kind: str
    #: Which files the pair was loaded from, with their sha256 (``cgidm_core.provenance``):
    #: {"pretrained": {...}, "finetuned": {...}}; set by ``cgidm_core.load_pair``.
    sources: dict[str, Any] | None = None
    #: For a LoRA: what says it is of the base's family (``FamilyEvidence.describe()``:
    #: ``source`` "metadata", "tensor_names" or "base", ``ambiguous`` when its tensor names fit
    #: several families and nothing but the base says which); ``None`` for other layouts.
    family_evidence: dict[str, Any] | None = None

    def __init__(
        self,
        *,
        denoiser_config: Any,
        pixels_per_latent: int,
        alphas_cumprod: torch.Tensor | None,
        prediction_type: str,
        prediction_type_finetuned: str | None,
        device: torch.device,
        dtype: torch.dtype,
        finetuned_kind: str,
        default_prompt: str | None = None,
        num_train_timesteps: int = 1000,
    ) -> None:
        """Set the state every adapter shares, so that each family states it in one place.

        ``denoiser_config`` is the config of the pretrained denoiser (a diffusers UNet's
        ``config``): its ``sample_size`` and ``in_channels`` give the latent shape, and with
        ``pixels_per_latent`` the image size. The schedule is kept as float32 on ``device``
        whatever the compute dtype, because the inversion's step arithmetic needs the precision.
        A fine-tune without its own ``prediction_type_finetuned`` predicts what its base does.
        ``num_train_timesteps`` counts the timesteps when there is no ``alphas_cumprod`` (flow
        matching); otherwise the schedule's length decides.
        """
        self.device = device
        self.dtype = dtype
        self.alphas_cumprod = (
            None if alphas_cumprod is None
            else alphas_cumprod.to(device=device, dtype=torch.float32)
        )
        self._num_train_timesteps = (
            int(alphas_cumprod.shape[0]) if alphas_cumprod is not None
            else int(num_train_timesteps)
        )
        self.prediction_type = prediction_type
        self.prediction_type_finetuned = prediction_type_finetuned or prediction_type
        self.finetuned_kind = finetuned_kind
        self.default_prompt = default_prompt
        size = denoiser_config.sample_size
        size = int(size if isinstance(size, int) else size[0])
        self.pixels_per_latent = pixels_per_latent
        self.latent_shape = (int(denoiser_config.in_channels), size, size)
        self.image_size = size * pixels_per_latent
        # A UNet halves its input once per down block but the last: the latent side must divide.
        blocks = len(getattr(denoiser_config, "block_out_channels", None) or (0,))
        self.latent_multiple = 2 ** max(0, blocks - 1)

    #: Whether the denoisers recompute activations in the backward pass (set by
    #: :meth:`set_gradient_checkpointing`, which ``authenticate`` calls for every run).
    gradient_checkpointing: bool = False

    def denoisers(self) -> list[torch.nn.Module]:
        """The networks the PGD differentiates through, each once (a LoRA pair's one UNet).

        An adapter lists its denoisers here (diffusers models with
        ``enable_gradient_checkpointing``) to get gradient checkpointing; the memory estimate per
        image comes from ``devices.ACTIVATION_COUNTS[family]``.
        """
        return []

    def checkpoint_function(self) -> Any:
        """The function the denoisers checkpoint their blocks with (``None``: diffusers'
        default, non-reentrant ``torch.utils.checkpoint``). A pair whose two models share one
        network in two states overrides it so that a block is recomputed in the state it ran in.
        """
        return None

    def batch_size_at(self, side: int) -> int:
        """Images per PGD batch at ``side`` pixels when the caller does not say."""
        return self.preferred_batch_size

    def set_gradient_checkpointing(self, mode: str = "auto", side: int | None = None) -> bool:
        """Switch activation checkpointing of the denoisers; returns whether it is on.

        ``mode`` "on"/"off" forces it; "auto" turns it on only on a GPU where one image at
        ``side`` pixels (default: the native size) would not fit the free memory without it.
        Recomputation runs the same operations on the same inputs, so scores do not change.
        """
        from cgidm_core.models.devices import available_gpu_bytes, checkpointing_needed
        from cgidm_core.names import GRADIENT_CHECKPOINTING_MODES

        if mode not in GRADIENT_CHECKPOINTING_MODES:
            raise ConfigError(f"gradient checkpointing must be auto, on or off, got {mode!r}")
        networks = [m for m in self.denoisers()
                    if getattr(m, "_supports_gradient_checkpointing", False)]
        if mode == "auto":
            latent_side = (side or self.image_size) // self.pixels_per_latent
            on = bool(networks) and self.device.type == "cuda" and checkpointing_needed(
                available_gpu_bytes(self.device), self.family, latent_side * latent_side,
                self.dtype)
        else:
            on = mode == "on"
        if on and not networks:
            raise ConfigError(f"this {self.family} pair's denoisers do not support gradient "
                              "checkpointing; use gradient_checkpointing 'off' or 'auto'")
        for network in networks:
            # diffusers' models define these (_supports_gradient_checkpointing, checked above);
            # torch.nn.Module's __getattr__ types them as a tensor or a module
            if on:
                network.enable_gradient_checkpointing(  # type: ignore[operator]
                    self.checkpoint_function())
            else:
                network.disable_gradient_checkpointing()  # type: ignore[operator]
        self.gradient_checkpointing = on
        return on

    def run_size(self, resolution: int | None) -> int:
        """The pixel side to run at: ``resolution`` if given (checked), else :attr:`image_size`.

        A side must be a whole number of latent pixels that the denoiser's down blocks can halve
        (a multiple of 8 x 4 = 32 for SD/SDXL at full size); the error names the nearest ones.
        """
        if resolution is None:
            return self.image_size
        step = self.pixels_per_latent * self.latent_multiple
        if resolution < step or resolution % step:
            lower = max(step, resolution // step * step)
            raise ConfigError(
                f"resolution {resolution} does not fit this {self.family} model: it must be a "
                f"multiple of {step} pixels (e.g. {lower} or {lower + step}); its native size is "
                f"{self.image_size}"
            )
        return int(resolution)

    @property
    def num_train_timesteps(self) -> int:
        return self._num_train_timesteps

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noised latent the models are trained to denoise at integer timesteps ``t``.

        The forward process is the family's, not the algorithm's: DDPM-style models (this
        default) see ``sqrt(abar_t) z0 + sqrt(1 - abar_t) noise``; a flow-matching family
        overrides this with its interpolation. ``t`` is on :attr:`device`, one per row.
        """
        assert self.alphas_cumprod is not None, "flow families override add_noise"
        abar = self.alphas_cumprod[t].view(-1, *([1] * (z0.ndim - 1)))
        return abar.sqrt() * z0 + (1.0 - abar).sqrt() * noise

    def loss_target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What ``eps_*`` predictions are compared with in the denoising loss.

        The noise for DDPM-style families (predictions of other kinds are converted to noise by
        the adapters); a flow-matching family returns the velocity ``noise - z0``.
        """
        return noise

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [-1, 1] to latents (deterministically)."""

    def encode_sampled(
        self, images: torch.Tensor, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """Latents *sampled* from the encoder's posterior, one CPU generator per image.

        What the reference code does (``latent_dist.sample()``); cgidm's default is the mean
        (:meth:`encode`). Codecs without a posterior (pixel space) have nothing to sample and
        return :meth:`encode`, leaving the generators untouched.
        """
        return self.encode(images)

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Map latents back to images in [-1, 1] (clamped)."""

    @abstractmethod
    def conditioning(self, prompt: str | None) -> Conditioning:
        """Encode a prompt for both models; cached, so the text encoders run once per prompt."""

    @abstractmethod
    def eps_finetuned(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Noise prediction of the fine-tuned model."""

    @abstractmethod
    def eps_pretrained(
        self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """Noise prediction of the pretrained model."""

    def describe(self) -> dict[str, Any]:
        """Facts about the pair for ``results.json`` settings and the service's model list."""
        return {
            "family": self.family,
            "image_size": self.image_size,
            "latent_shape": list(self.latent_shape),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "gradient_checkpointing": self.gradient_checkpointing,
            **({"family_evidence": self.family_evidence} if self.family_evidence else {}),
        }

    def memory_bytes(self) -> int:
        """Bytes held by the pair's parameters and buffers now, each shared tensor counted once."""
        return storage_bytes(self.modules())

    def resident_bytes(self) -> int:
        """Bytes the pair keeps between uses: what a cache holding it for later jobs budgets.

        The same as :meth:`memory_bytes` unless the pair drops weights after each use (a Stable
        Diffusion pair's text encoders once a prompt is encoded): right after loading those are
        still in memory, but a cache that counted them would overstate every pair it keeps.
        """
        return self.memory_bytes()

    def modules(self) -> list[torch.nn.Module]:
        """Every network the pair holds (shared ones once); used for memory accounting."""
        return []


def storage_bytes(modules: list[torch.nn.Module]) -> int:
    """Bytes of the parameters and buffers of ``modules``, each storage counted once.

    Counting storages rather than tensors keeps tied weights and modules shared between the two
    models from being counted twice; meta tensors (released weights) have no storage to count.
    """
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            key = tensor.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total
