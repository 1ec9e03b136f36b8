"""Flux.2 Klein (Black Forest Labs' 4B/9B Flux.2 with a Qwen3 text encoder): one adapter module,
recognition to pair. Flux.2 dev (Mistral-3 encoder behind a Pixtral processor) is its own entry,
:mod:`cgidm_core.models.flux2_dev`, which reuses this module's codec and pair.

A rectified-flow transformer, so the forward process and the target are
:class:`~cgidm_core.models.flow.FlowMatchingPair`'s; the pair reuses the SD adapter's machinery.
As diffusers' ``Flux2KleinPipeline`` runs it:

- the latent: the diffusion runs on the VAE latent PATCHIFIED into 2x2 patches (4 x 32 = 128
  channels at 1/16 of the image side) and normalised by the VAE's batch-norm running statistics
  (``vae.bn``). :class:`Flux2VAE2D` presents exactly that space as a 2-D VAE (an affine map of
  the posterior: mean ``(patchify(m) - mu) / sigma``, std ``patchify(s) / sigma``), so the
  inversion, the mask and the SD codec run unchanged; each latent pixel is one token (``(t, h,
  w, l)`` = ``(0, row, col, 0)`` position ids);
- the text: the prompt in the tokenizer's chat template (``enable_thinking=False``), padded to
  512 tokens, Qwen3's hidden states of layers 9, 18 and 27 stacked along the features (all
  tokens), text ids ``(0, 0, 0, position)``;
- the time: ``s`` (the pipeline passes ``timestep / 1000``), shifted by ``exp(mu)`` with
  ``mu = compute_empirical_mu(tokens, 50)``: the pipeline's own rule at its default 50 steps
  (Flux.2's shift depends on the step count; the inversion has none, so the default is used);
- no guidance embedding in Klein (``guidance_embeds`` false; a transformer with one is Flux.2
  dev's).

Layouts: ``Flux2KleinPipeline`` folders, ``transformer/`` folders, a one-file transformer in
BFL's naming (``flux-2-klein-4b.safetensors`` as Black Forest Labs and ComfyUI publish it,
optionally under ``model.diffusion_model.``; converted by diffusers'
``convert_flux2_transformer_checkpoint_to_diffusers`` with the base folder's config, as a
fine-tune or as the pretrained transformer with ``--pretrained-config``), LoRAs through diffusers'
Flux.2 loader (diffusers/peft names tested on Klein; its converters for ai-toolkit's BFL names and
musubi / sd-scripts' ``lora_unet_*`` names are tested on Flux.2 dev, ``tests/test_flux2_dev.py``).
float8-quantised files (the ``-fp8`` releases, ComfyUI's scaled fp8) are refused by name: the
converter maps names only, so their scales would not load.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from cgidm_core.errors import (
    IncompatiblePairError,
    ModelFormatError,
    UnsupportedModelFamilyError,
)
from cgidm_core.key_signatures import is_flux2_klein_file
from cgidm_core.models.flow import FlowMatchingPair
from cgidm_core.models.formats import (
    SUPPORTED_HINT,
    read_json,
)
from cgidm_core.models.sd_loading import (
    LoadOptions,
    loading_errors,
)
from cgidm_core.models.stable_diffusion import (
    StableDiffusionLoraPair,
    StableDiffusionPair,
)
from cgidm_core.models.transformer_adapter import (
    TransformerAdapter,
    TransformerBase,
    TransformerFamily,
    auto_tokenizer,
    base_transformer,
    load_model_type_encoder,
    require_pipeline_parts,
)
from cgidm_core.names import FLUX2_FAMILY

if TYPE_CHECKING:  # annotations only; mypy reads these packages as Any (pyproject.toml)
    from diffusers import AutoencoderKLFlux2
    from transformers import PreTrainedTokenizerBase

# -- recognition (no weights read) ---------------------------------------------------------------

PIPELINE_CLASS = "Flux2KleinPipeline"
TRANSFORMER_CLASS = "Flux2Transformer2DModel"
TEXT_TOKENS = 512
#: Qwen3 layers whose hidden states Klein stacks (``Flux2KleinPipeline.encode_prompt``).
TEXT_LAYERS = (9, 18, 27)
#: The step count Flux.2's time shift is computed for (the pipeline's default).
SHIFT_STEPS = 50
_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"

def flux2_pipeline_family(folder: Path, name: str, index: dict[str, Any]) -> str:
    """``flux2`` for a ``Flux2KleinPipeline`` folder; the edit/inpaint/KV variants are refused
    by name (Flux.2 dev's ``Flux2Pipeline`` is its own entry, :mod:`cgidm_core.models.flux2_dev`,
    above this one in the registry)."""
    config_file = folder / "transformer" / "config.json"
    transformer = read_json(config_file) if config_file.is_file() else {}
    if name != PIPELINE_CLASS or transformer.get("_class_name", TRANSFORMER_CLASS) != (
            TRANSFORMER_CLASS) or transformer.get("guidance_embeds"):
        raise UnsupportedModelFamilyError(
            f"{folder} is a {name} model: of Flux.2 cgidm supports the text-to-image "
            f"{PIPELINE_CLASS} (Klein). " + SUPPORTED_HINT)
    require_pipeline_parts(folder, name, index)
    return FLUX2_FAMILY


# -- the codec -----------------------------------------------------------------------------------


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, 4C, H/2, W/2)``, as ``Flux2KleinPipeline._patchify_latents``."""
    n, c, h, w = latents.shape
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(n, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    n, c, h, w = latents.shape
    patches = latents.reshape(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return patches.reshape(n, c // 4, h * 2, w * 2)


class Flux2VAE2D(torch.nn.Module):
    """``AutoencoderKLFlux2`` in the space the transformer works in: patchified, normalised by
    the VAE's batch-norm statistics (see the module docstring)."""

    bn_mean: torch.Tensor  # buffers, registered below
    bn_std: torch.Tensor

    def __init__(self, vae: AutoencoderKLFlux2) -> None:
        super().__init__()
        self.vae = vae
        config = vae.config
        std = torch.sqrt(vae.bn.running_var.float() + float(config.batch_norm_eps))
        self.register_buffer("bn_mean", vae.bn.running_mean.float().view(1, -1, 1, 1).clone(),
                             persistent=False)
        self.register_buffer("bn_std", std.view(1, -1, 1, 1).clone(), persistent=False)
        self.config = SimpleNamespace(
            scaling_factor=1.0, shift_factor=0.0, latent_channels=4 * int(config.latent_channels),
            block_out_channels=(0,) * (len(config.block_out_channels) + 1),
            sample_size=config.sample_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        dist = self.vae.encode(x).latent_dist
        mean = (patchify(dist.mean.float()) - self.bn_mean) / self.bn_std
        std = patchify(dist.std.float()) / self.bn_std
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=std))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        latents = unpatchify(z.float() * self.bn_std + self.bn_mean)
        return SimpleNamespace(sample=self.vae.decode(latents.to(self.dtype)).sample)


# -- the pair ------------------------------------------------------------------------------------


def flux2_shift(config: dict[str, Any], tokens: int) -> float:
    """``exp(mu)`` of ``compute_empirical_mu(tokens, 50)`` where the scheduler shifts
    dynamically (Flux.2's configs), else the config's fixed ``shift``."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    if not config.get("use_dynamic_shifting", False):
        return float(config.get("shift", 1.0))
    mu = compute_empirical_mu(image_seq_len=tokens, num_steps=SHIFT_STEPS)
    return float(mu) if config.get("time_shift_type", "exponential") == "linear" else math.exp(mu)


def stack_hidden_states(out: Any, layers: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The text encoder's hidden states of ``layers`` side by side along the features, as both
    Flux.2 pipelines stack them (``(B, L, len(layers) * width)``)."""
    stacked = torch.stack([out.hidden_states[k] for k in layers], dim=1)
    batch, count, length, width = stacked.shape
    return stacked.permute(0, 2, 1, 3).reshape(batch, length, count * width).to(dtype)


class _Flux2Conditioning:
    """What a Flux.2 pair does differently from an SD pair (mixin before FlowMatchingPair).
    Klein's; Flux.2 dev's (:mod:`cgidm_core.models.flux2_dev`) overrides the text path, the
    stacked layers and the guidance."""

    family = FLUX2_FAMILY
    variant = "klein"
    #: The text encoder's layers whose hidden states are stacked.
    text_layers: tuple[int, ...] = TEXT_LAYERS
    #: The guidance a guidance-distilled transformer is given (``None``: it has no embedding).
    guidance: float | None = None
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype

    def __init__(self, *, scheduler_config: dict[str, Any], **kwargs: Any) -> None:
        vae = kwargs["vae"]
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        kwargs.setdefault("denoiser_config", SimpleNamespace(
            sample_size=int(vae.config.sample_size) // scale,
            in_channels=vae.config.latent_channels, block_out_channels=(0,)))
        self.scheduler_config = dict(scheduler_config)
        super().__init__(**kwargs)

    def shift_for(self, latent: torch.Tensor) -> float:
        return flux2_shift(self.scheduler_config, latent.shape[-2] * latent.shape[-1])

    def _embed(self, tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module,
               prompt: str) -> torch.Tensor:
        del tokenizer  # both models read the base's tokenizer
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
            enable_thinking=False)
        tokens = self.tokenizer(text, return_tensors="pt", padding="max_length", truncation=True,
                                max_length=TEXT_TOKENS)
        with torch.no_grad():
            out = text_encoder(input_ids=tokens.input_ids.to(self.device),
                               attention_mask=tokens.attention_mask.to(self.device),
                               output_hidden_states=True, use_cache=False)
        return stack_hidden_states(out, self.text_layers, self.dtype)

    def _predict(self, unet: torch.nn.Module, z_t: torch.Tensor, t: torch.Tensor,
                 context: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """The velocity ``noise - x0`` at ``z_t`` (one token per latent pixel), float32."""
        del prediction_type
        z_t = z_t.to(self.device, torch.float32)
        batch, channels, height, width = z_t.shape
        # defined by the pair class this mixin is combined with (below)
        s = self.batch_sigmas(t, z_t)  # type: ignore[attr-defined]
        hidden = context.to(self.device, self.dtype)
        if hidden.shape[0] != batch:
            hidden = hidden.expand(batch, *hidden.shape[1:])
        zero = torch.arange(1)
        img_ids = torch.cartesian_prod(zero, torch.arange(height), torch.arange(width), zero)
        txt_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(hidden.shape[1]))
        tokens = z_t.reshape(batch, channels, height * width).permute(0, 2, 1)
        guidance = None if self.guidance is None else torch.full(
            (batch,), self.guidance, device=self.device, dtype=torch.float32)
        output = unet(hidden_states=tokens.to(self.dtype),
                      timestep=(s * 1000).to(self.dtype) / 1000,  # the pipeline's arithmetic
                      guidance=guidance, encoder_hidden_states=hidden,
                      txt_ids=txt_ids.to(self.device).expand(batch, -1, -1),
                      img_ids=img_ids.to(self.device).expand(batch, -1, -1),
                      return_dict=False)[0]
        return output.float().permute(0, 2, 1).reshape(batch, channels, height, width)

    def describe(self) -> dict[str, Any]:
        # super() is the pair class the mixin is combined with; mypy sees object
        return {**super().describe(),  # type: ignore[misc]
                "variant": self.variant, "text_layers": list(self.text_layers),
                "guidance": self.guidance,
                # defined by the pair class this mixin is combined with (below)
                "time_shift_at_native_size": self.native_time_shift()}  # type: ignore[attr-defined]


class Flux2Pair(_Flux2Conditioning, FlowMatchingPair, StableDiffusionPair):
    """A Flux.2 Klein base and a fine-tune (pipeline or ``transformer/`` folder)."""


class Flux2LoraPair(_Flux2Conditioning, FlowMatchingPair, StableDiffusionLoraPair):
    """A Flux.2 Klein base and a LoRA of it: ONE transformer, adapter on and off."""


# -- loading -------------------------------------------------------------------------------------


def load_qwen3_lm(folder: Path, opts: LoadOptions) -> Any:
    return load_model_type_encoder(folder, opts, model_type="qwen3",
                                   class_name="Qwen3ForCausalLM",
                                   expected="the Qwen3 encoder Flux.2 Klein uses")


#: The prefix ComfyUI's checkpoint savers put before the transformer's names.
_COMFY_PREFIX = "model.diffusion_model."


def load_bfl_transformer_file(spec: TransformerFamily, file: Path, config_folder: Path,
                              opts: LoadOptions, *, recognised: Callable[[list[str]], bool],
                              missing: str) -> Any:
    """A Flux.2 transformer as one file in BFL's naming (dev's or Klein's), converted by
    diffusers' ``from_single_file`` with the base folder's config. The converter renames BFL's
    names but does not strip ComfyUI's ``model.diffusion_model.`` (a KeyError on the first block
    name), so the prefix is stripped here; float8 files are refused from the header, before any
    weight is read."""
    import diffusers
    from safetensors import safe_open
    from safetensors.torch import load_file

    from cgidm_core.models.formats import safetensors_keys

    if not recognised(safetensors_keys(file)):
        raise IncompatiblePairError(f"{file} holds no {missing}")
    with loading_errors("the single-file transformer", file):
        with safe_open(str(file), framework="pt") as header:  # dtypes without reading weights
            names = list(header.keys())  # a safe_open handle is not iterable
            quantised = sorted(k for k in names if header.get_slice(k).get_dtype().startswith(
                "F8"))
        if quantised:
            raise ModelFormatError(
                f"{file} is a float8-quantised {spec.title} transformer ({quantised[0]} and "
                f"{len(quantised) - 1} more float8 tensors): diffusers' converter maps names "
                "only and would drop its scales (weight_scale / scale_weight / comfy_quant, "
                "one layout per quantising tool), so cgidm does not dequantise it; give the "
                "bf16 release of the same weights, or dequantise it to bf16 with the tool that "
                "quantised it")
        state = {k.removeprefix(_COMFY_PREFIX): v for k, v in load_file(str(file)).items()}
    with loading_errors("the single-file transformer", file, mismatch_is_incompatible=True):
        return getattr(diffusers, spec.transformer_class).from_single_file(
            state, config=str(config_folder), subfolder="transformer", local_files_only=True,
            torch_dtype=opts.dtype)


def load_single_file(path: Path, config_folder: Path, opts: LoadOptions) -> Any:
    return load_bfl_transformer_file(
        SPEC, path, config_folder, opts, recognised=is_flux2_klein_file,
        missing="Flux.2 Klein transformer (double_stream_modulation_img.* and no "
                "guidance_in.* tensors); the pretrained model is Flux.2 Klein")


#: Fine-tuned text encoders are not read: both models are conditioned by the base's Qwen3
#: (Klein fine-tunes train the transformer).
SPEC = TransformerFamily(
    family=FLUX2_FAMILY, title="Flux.2", base_title="Flux.2 Klein",
    pipeline_class=PIPELINE_CLASS, transformer_class=TRANSFORMER_CLASS,
    text_encoder=load_qwen3_lm, single_file=load_single_file, reads_finetuned_encoder=False,
    no_own_encoder="a Flux.2 fine-tune has no text encoder of its own here",
    architecture=("in_channels", "num_layers", "num_single_layers", "attention_head_dim",
                  "num_attention_heads", "joint_attention_dim", "guidance_embeds"))


def load_flux2_vae(folder: Path, opts: LoadOptions) -> Flux2VAE2D:
    from diffusers import AutoencoderKLFlux2

    with loading_errors("the VAE", folder / "vae"):
        vae = AutoencoderKLFlux2.from_pretrained(
            folder, subfolder="vae", use_safetensors=True,
            local_files_only=opts.local_files_only, torch_dtype=torch.float32)
    return Flux2VAE2D(vae.eval())


def load_flux2_base(folder: Path, opts: LoadOptions, transformer_file: Path | None = None
                    ) -> TransformerBase:
    tokenizer = auto_tokenizer(folder, opts)
    config_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json(config_file)
    if scheduler.get("_class_name", _SCHEDULER_CLASS) != _SCHEDULER_CLASS:
        raise ModelFormatError(f"{config_file}: Flux.2 samples with {_SCHEDULER_CLASS}")
    base = TransformerBase(
        folder=folder, transformer=base_transformer(SPEC, folder, opts, transformer_file),
        vae=load_flux2_vae(folder, opts), text_encoder=load_qwen3_lm(folder, opts),
        tokenizer=tokenizer, scheduler_config=scheduler)
    config = base.transformer.config
    layers = base.text_encoder.config.num_hidden_layers
    width = len(TEXT_LAYERS) * base.text_encoder.config.hidden_size
    latent = int(base.vae.config.latent_channels)
    if layers < max(TEXT_LAYERS) or (config.joint_attention_dim, config.in_channels) != (
            width, latent):
        raise UnsupportedModelFamilyError(
            f"{folder}: the transformer expects {config.joint_attention_dim}-dim text features "
            f"and {config.in_channels} latent channels, but Qwen3 ({layers} layers) gives "
            f"{width} from layers {TEXT_LAYERS} and the VAE {latent}: not a Flux.2 Klein layout")
    return base


ADAPTER = TransformerAdapter(
    SPEC, pipeline_family=flux2_pipeline_family, load_base=load_flux2_base, pair=Flux2Pair,
    lora_pair=Flux2LoraPair)


# -- the family registry's adapter interface (``cgidm_core.families.FamilyAdapter``, #23) ---------


check_pipeline_folder = ADAPTER.check_pipeline_folder
load_pair = ADAPTER.load_pair
load_lora_base = ADAPTER.load_lora_base
