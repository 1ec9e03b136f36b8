"""Stable Diffusion 1.x/2.x pairs in the VAE's latent space.

What the reference code loads twice is held once here: one VAE, one tokenizer, one noise
schedule; the fine-tuned text encoder only when the fine-tune changed it; and for a LoRA
fine-tune a single UNet whose adapter is switched on for the fine-tuned model and off for the
pretrained one.

Text encoders are needed once per prompt, and the inversion then runs for minutes on the cached
embeddings. A pair can therefore drop their weights after a new prompt is encoded
(``keep_text_encoders=False``, what :func:`cgidm_core.models.load_pair_from_paths` does by
default) and read
them again from disk when a prompt it has not seen arrives. That is what brings a DreamBooth pair
below the memory of the reference's two pipelines; see docs/PERFORMANCE.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from cgidm_core.errors import ConfigError
from cgidm_core.models.devices import available_gpu_bytes, family_batch_size, unique_modules
from cgidm_core.models.predictions import expand_timesteps, output_to_eps
from cgidm_core.models.text_encoders import tokenize
from cgidm_core.names import SD_FAMILY
from cgidm_core.pair import Conditioning, ModelPair, storage_bytes

if TYPE_CHECKING:  # annotations only; mypy reads these packages as Any (pyproject.toml)
    from diffusers import AutoencoderKL
    from transformers import PreTrainedTokenizerBase

#: Builds fresh copies of a pair's text encoders, exactly as loading built them, on the pair's
#: device and dtype: ``(pretrained, finetuned)``, the second ``None`` when ``finetuned`` is False
#: (the fine-tune uses the pretrained encoder). See ``sd_loading.text_encoder_reloader``.
TextEncoderReloader = Callable[[bool], tuple[torch.nn.Module, torch.nn.Module | None]]


def _release_weights(module: torch.nn.Module) -> None:
    """Replace every parameter and buffer by a storage-less meta tensor, keeping the module.

    The module object survives (with its hooks, peft layers and any outside reference to it), so
    reloading puts tensors back into the same object instead of swapping in a new one.
    """
    module.to("meta")


def _adopt_weights(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Move the parameters and buffers of ``source`` into ``target`` (same architecture).

    Both are walked in module order; names must match one to one, which holds because the
    reloader builds ``source`` exactly as ``target`` was built (peft adapter layers included).
    Non-persistent buffers (CLIP's ``position_ids``) travel too, which ``load_state_dict`` would
    leave on the meta device.
    """
    targets = dict(target.named_modules(remove_duplicate=False))
    sources = dict(source.named_modules(remove_duplicate=False))
    if targets.keys() != sources.keys():
        raise ConfigError(
            "the reloaded text encoder does not have the architecture of the released one; was "
            "the model folder changed on disk since the pair was loaded? Load the pair again"
        )
    for name, module in targets.items():
        donor = sources[name]
        for key in list(module._parameters):
            module._parameters[key] = donor._parameters[key]
        for key in list(module._buffers):
            module._buffers[key] = donor._buffers[key]


def return_freed_memory(device: torch.device) -> None:
    """Hand memory of dropped tensors back to the system, so it shows in RSS / nvidia-smi.

    glibc keeps freed medium-sized blocks in its heap (only huge blocks are unmapped at once);
    ``malloc_trim`` returns them. On CUDA the caching allocator keeps freed blocks for reuse by
    this process, which is what the inversion wants, so they are left cached.
    """
    gc.collect()
    if device.type != "cpu":
        return
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


class StableDiffusionPair(ModelPair):
    """A Stable Diffusion base and a fine-tune of it (full, DreamBooth or single-file).

    The VAE runs in float32 whatever the networks' dtype: it is used twice per image, and the SD
    decoder can overflow in float16. A pair is not meant for concurrent use from several threads.
    """

    family = SD_FAMILY

    def __init__(
        self,
        *,
        vae: AutoencoderKL,  # or a module read the same way (QwenImageVAE2D, Flux2VAE2D)
        tokenizer: PreTrainedTokenizerBase,
        alphas_cumprod: torch.Tensor | None,
        unet_pretrained: torch.nn.Module,
        unet_finetuned: torch.nn.Module,
        text_encoder_pretrained: torch.nn.Module,
        text_encoder_finetuned: torch.nn.Module,
        tokenizer_finetuned: PreTrainedTokenizerBase | None = None,
        prediction_type: str = "epsilon",
        prediction_type_finetuned: str | None = None,
        device: torch.device,
        dtype: torch.dtype,
        finetuned_kind: str = "pipeline",
        default_prompt: str | None = None,
        keep_text_encoders: bool = True,
        text_encoder_reloader: TextEncoderReloader | None = None,
        denoiser_config: Any = None,
    ) -> None:
        """``keep_text_encoders=False`` drops the text encoders' weights after every prompt the
        pair has not encoded before; it needs ``text_encoder_reloader`` to read them back.

        ``denoiser_config`` gives the latent shape when the denoiser's own config does not (a
        Flux transformer works on packed tokens); by default it is ``unet_pretrained.config``.
        """
        if not keep_text_encoders and text_encoder_reloader is None:
            raise ConfigError(
                "keep_text_encoders=False needs a text_encoder_reloader to read the encoders "
                "back for a new prompt; pass one, or keep them and call release_text_encoders() "
                "yourself once every prompt is encoded"
            )
        self.vae = vae
        self.tokenizer = tokenizer
        self.tokenizer_finetuned = tokenizer if tokenizer_finetuned is None else tokenizer_finetuned
        self.unet_pretrained = unet_pretrained
        self.unet_finetuned = unet_finetuned
        self.text_encoder_pretrained = text_encoder_pretrained
        self.text_encoder_finetuned = text_encoder_finetuned
        super().__init__(
            denoiser_config=(
                unet_pretrained.config if denoiser_config is None else denoiser_config
            ),
            # Each VAE down block but the last halves the side.
            pixels_per_latent=2 ** (len(vae.config.block_out_channels) - 1),
            alphas_cumprod=alphas_cumprod,
            prediction_type=prediction_type,
            prediction_type_finetuned=prediction_type_finetuned,
            device=device,
            dtype=dtype,
            finetuned_kind=finetuned_kind,
            default_prompt=default_prompt,
        )
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self._cache: dict[str, Conditioning] = {}
        self.keep_text_encoders = keep_text_encoders
        self._text_encoder_reloader = text_encoder_reloader
        self._text_encoders_released = False

    @property
    # ModelPair declares a plain int; an SD pair computes it from free memory
    def preferred_batch_size(self) -> int:  # type: ignore[override]
        """8 on a CPU; on a GPU as many images as its free memory holds, up to 32.

        On a GPU the step time hardly grows up to batch 8 (the UNets are launch-bound there),
        so a fixed 8 left most of an H200 idle; the batch is sized each time it is asked for,
        so a worker holding several cached pairs plans around the memory they already take.
        """
        return self.batch_size_at(self.image_size)

    def batch_size_at(self, side: int) -> int:
        """8 on a CPU; on a GPU from free memory and the family's activation bytes per image
        at ``side`` pixels (``devices.image_activation_bytes``, smaller with checkpointing)."""
        if self.device.type != "cuda":
            return 8
        latent = side // self.pixels_per_latent
        return family_batch_size(available_gpu_bytes(self.device), self.family, latent * latent,
                                 self.dtype, self.gradient_checkpointing)

    def denoisers(self) -> list[torch.nn.Module]:
        return unique_modules([self.unet_pretrained, self.unet_finetuned])

    # -- codec ---------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic latents: the posterior mean, shifted and scaled as the UNet expects."""
        x = images.to(self.device, self.vae.dtype)
        mean = self.vae.encode(x).latent_dist.mean
        return ((mean.float() - self.shift_factor) * self.scaling_factor).float()

    def encode_sampled(
        self, images: torch.Tensor, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """``latent_dist.sample()`` as the reference draws it, but from each image's generator.

        The draw is ``mean + std * n`` with ``n`` standard normal, drawn on the CPU from image
        i's generator so that it does not depend on the device or on the rest of the batch.
        """
        if len(generators) != images.shape[0]:
            raise ConfigError(f"need one generator per image: {len(generators)} for "
                              f"{images.shape[0]} images")
        x = images.to(self.device, self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        noise = torch.stack(
            [torch.randn(tuple(mean.shape[1:]), generator=g) for g in generators]
        ).to(mean.device)
        sample = mean + std * noise
        return ((sample - self.shift_factor) * self.scaling_factor).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1.0, 1.0)

    # -- conditioning --------------------------------------------------------------------------

    def _embed(self, tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module,
               prompt: str) -> torch.Tensor:
        tokens = tokenize(tokenizer, prompt)
        mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        with torch.no_grad():
            hidden = text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden.to(self.dtype)

    def _embed_finetuned(self, prompt: str) -> torch.Tensor:
        return self._embed(self.tokenizer_finetuned, self.text_encoder_finetuned, prompt)

    def _embed_pretrained(self, prompt: str) -> torch.Tensor:
        return self._embed(self.tokenizer, self.text_encoder_pretrained, prompt)

    def _shares_text_encoder(self) -> bool:
        return (
            self.text_encoder_finetuned is self.text_encoder_pretrained
            and self.tokenizer_finetuned is self.tokenizer
        )

    def conditioning(self, prompt: str | None) -> Conditioning:
        """Text embeddings of ``prompt`` for each model (no classifier-free guidance), cached."""
        text = prompt if prompt is not None else (self.default_prompt or "")
        cached = self._cache.get(text)
        if cached is None:
            self.load_text_encoders()
            try:
                pretrained = self._embed_pretrained(text)
                finetuned = (pretrained if self._shares_text_encoder()
                             else self._embed_finetuned(text))
            finally:
                # also when encoding fails (out of memory, say): a cached pair must not keep
                # weights its cache entry does not count (resident_bytes)
                if not self.keep_text_encoders:
                    self.release_text_encoders()
            cached = Conditioning(finetuned=finetuned, pretrained=pretrained)
            self._cache[text] = cached
        return cached

    # -- text encoder lifetime -----------------------------------------------------------------

    @property
    def text_encoders_loaded(self) -> bool:
        return not self._text_encoders_released

    def _text_encoder_modules(self) -> list[torch.nn.Module]:
        return unique_modules([self.text_encoder_pretrained, self.text_encoder_finetuned])

    def release_text_encoders(self) -> int:
        """Drop the text encoders' weights; cached prompt embeddings stay usable.

        Returns the bytes of weights dropped (0 if they were already released). A prompt that is
        not cached afterwards reloads them (see :meth:`load_text_encoders`).
        """
        if self._text_encoders_released:
            return 0
        before = self.memory_bytes()
        for module in self._text_encoder_modules():
            _release_weights(module)
        self._text_encoders_released = True
        self._after_text_encoders_changed()
        return_freed_memory(self.device)
        return before - self.memory_bytes()

    def load_text_encoders(self) -> None:
        """Read released text encoders back (from the model files) into the same modules."""
        if not self._text_encoders_released:
            return
        if self._text_encoder_reloader is None:
            raise ConfigError(
                "this pair's text encoders were released and it has no way to reload them (it "
                "was built in memory without a text_encoder_reloader); encode every prompt "
                "before calling release_text_encoders(), or load the pair with load_pair()"
            )
        need_finetuned = self.text_encoder_finetuned is not self.text_encoder_pretrained
        pretrained, finetuned = self._text_encoder_reloader(need_finetuned)
        _adopt_weights(self.text_encoder_pretrained, pretrained)
        if need_finetuned:
            if finetuned is None:
                raise ConfigError("the text encoder reloader gave no fine-tuned text encoder")
            _adopt_weights(self.text_encoder_finetuned, finetuned)
        self._text_encoders_released = False
        self._after_text_encoders_changed()

    def _after_text_encoders_changed(self) -> None:
        """Hook for subclasses that keep references into the text encoders' layers."""

    # -- noise predictions ---------------------------------------------------------------------

    def _predict(
        self,
        unet: torch.nn.Module,
        z_t: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        prediction_type: str,
    ) -> torch.Tensor:
        z_t = z_t.to(self.device, torch.float32)
        batch = z_t.shape[0]
        steps = expand_timesteps(t, batch, self.device)
        context = context.to(self.device, self.dtype)
        if context.shape[0] != batch:
            context = context.expand(batch, *context.shape[1:])
        output = unet(z_t.to(self.dtype), steps, encoder_hidden_states=context).sample.float()
        # alphas_cumprod is None only for flow-matching pairs, which predict elsewhere
        return output_to_eps(output, z_t, steps, prediction_type,
                             self.alphas_cumprod)  # type: ignore[arg-type]

    def eps_finetuned(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self._predict(
            self.unet_finetuned, z_t, t, cond.finetuned, self.prediction_type_finetuned
        )

    def eps_pretrained(
        self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        return self._predict(self.unet_pretrained, z_t, t, cond.pretrained, self.prediction_type)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _kept_modules(self) -> list[torch.nn.Module]:
        """Networks that hold their weights for the pair's whole life (all but text encoders)."""
        return [self.unet_pretrained, self.unet_finetuned, self.vae]

    def modules(self) -> list[torch.nn.Module]:
        """Networks holding weights now: released text encoders hold none and are left out."""
        text_encoders = [] if self._text_encoders_released else self._text_encoder_modules()
        return unique_modules([*self._kept_modules(), *text_encoders])

    def resident_bytes(self) -> int:
        """Without ``keep_text_encoders`` the text encoders are left out even while loaded.

        They are in memory from loading until the first prompt is encoded, and again only while
        a new prompt is encoded; between jobs the pair holds the UNets and the VAE alone.
        """
        if self.keep_text_encoders:
            return self.memory_bytes()
        return storage_bytes(unique_modules(self._kept_modules()))

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "finetuned_kind": self.finetuned_kind,
            "prediction_type": self.prediction_type,
            # a v-pred fine-tune of an epsilon base (or the reverse) predicts another quantity
            "prediction_type_finetuned": self.prediction_type_finetuned,
            "shared_text_encoder": self._shares_text_encoder(),
            "keep_text_encoders": self.keep_text_encoders,
        }


class AdapterSwitch:
    """Turns every peft adapter layer of some networks on or off.

    Each call sets the state it needs (instead of trusting the previous call to have restored
    it), so an exception in one forward pass cannot leave the other model running with the wrong
    weights. peft's ``enable_adapters`` makes adapter weights trainable again; they are frozen
    right after, because the inversion differentiates only with respect to its input.
    """

    def __init__(self, networks: list[torch.nn.Module]) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        #: The state the last :meth:`set` asked for (None before the first).
        self.current: bool | None = None
        self.layers = [
            module
            for network in networks
            for module in network.modules()
            if isinstance(module, BaseTunerLayer)
        ]
        self.parameters = [
            param
            for layer in self.layers
            for name, param in layer.named_parameters()
            if "lora_" in name
        ]

    def __len__(self) -> int:
        return len(self.layers)

    def set(self, enabled: bool) -> None:
        self.current = enabled
        # Reading every layer's flag is cheap and catches anyone else having toggled them.
        if all(bool(layer.disable_adapters) != enabled for layer in self.layers):
            return
        for layer in self.layers:
            layer.enable_adapters(enabled)
        for param in self.parameters:
            param.requires_grad_(False)


def adapter_state_checkpoint(switch: AdapterSwitch) -> Callable[..., Any]:
    """A gradient-checkpointing function for a network shared by two models through an adapter.

    Checkpointing recomputes a block during the backward pass, by which time the pair has
    switched the adapter for the other model: the fine-tuned pass would be recomputed without
    its LoRA (torch refuses it when the saved tensors differ, and would compute a wrong gradient
    when they do not). Each block therefore remembers the adapter state it ran in and is
    recomputed in that state, the current state being restored afterwards.
    """
    from torch.utils.checkpoint import checkpoint

    def run(module: torch.nn.Module, *args: Any) -> Any:
        state = switch.current

        def segment(*inputs: Any) -> Any:
            now = switch.current
            if state is None or now == state:
                return module(*inputs)
            switch.set(state)  # a recomputation in the backward pass
            try:
                return module(*inputs)
            finally:
                # not None: `state` was not None, so a set() had run before `now` was read
                switch.set(now)  # type: ignore[arg-type]

        return checkpoint(segment, *args, use_reentrant=False)

    return run


class StableDiffusionLoraPair(StableDiffusionPair):
    """A base and a LoRA fine-tune of it: ONE UNet (and text encoder) with a switchable adapter."""

    def checkpoint_function(self) -> Callable[..., Any]:
        return adapter_state_checkpoint(self.unet_adapter)

    def __init__(self, *, unet: torch.nn.Module, text_encoder: torch.nn.Module, **kwargs: Any):
        super().__init__(
            unet_pretrained=unet,
            unet_finetuned=unet,
            text_encoder_pretrained=text_encoder,
            text_encoder_finetuned=text_encoder,
            finetuned_kind="lora",
            **kwargs,
        )
        self.unet_adapter = AdapterSwitch([unet])
        self.text_encoder_adapter = AdapterSwitch([text_encoder])

    def _shares_text_encoder(self) -> bool:
        # Same module, but with a text-encoder LoRA it computes two different things.
        return len(self.text_encoder_adapter) == 0

    def _after_text_encoders_changed(self) -> None:
        # The switch holds the adapter's parameter objects, which a release or reload replaced.
        self.text_encoder_adapter = AdapterSwitch([self.text_encoder_pretrained])

    def _embed_finetuned(self, prompt: str) -> torch.Tensor:
        self.text_encoder_adapter.set(True)
        return super()._embed_finetuned(prompt)

    def _embed_pretrained(self, prompt: str) -> torch.Tensor:
        self.text_encoder_adapter.set(False)
        return super()._embed_pretrained(prompt)

    def eps_finetuned(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        self.unet_adapter.set(True)
        return super().eps_finetuned(z_t, t, cond)

    def eps_pretrained(
        self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        self.unet_adapter.set(False)
        return super().eps_pretrained(z_t, t, cond)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "lora_unet_layers": len(self.unet_adapter),
            "lora_text_encoder_layers": len(self.text_encoder_adapter),
        }
