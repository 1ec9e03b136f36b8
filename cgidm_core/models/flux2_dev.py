"""Flux.2 dev (Black Forest Labs' 32B Flux.2 with a Mistral-Small-3.x text encoder): one adapter
module, recognition to pair, on :mod:`cgidm_core.models.transformer_adapter` and Klein's codec
and pair (:mod:`cgidm_core.models.flux2`).

What differs from Klein, as diffusers' ``Flux2Pipeline`` runs it:

- the text: the pipeline's system message (``diffusers.pipelines.flux2.system_messages.
  SYSTEM_MESSAGE``) and the prompt as a two-message conversation whose contents are lists of
  text chunks (the pipeline's own ``format_input``), rendered with the chat template
  (``add_generation_prompt=False``), padded/truncated to 512 tokens; Mistral-3's hidden states of
  layers 10, 20 and 30 stacked along the features;
- the tokenizer folder is a Pixtral PROCESSOR folder: ``Flux2Pipeline`` loads it with
  ``AutoProcessor``, which transformers builds only with torchvision (the image processor's
  backend). The text path needs only what the processor does with text: render its chat template
  with the tokenizer's special tokens, then tokenize, without adding special tokens when the
  rendered text already starts with the BOS token (``ProcessorMixin.apply_chat_template``).
  :func:`load_mistral_tokenizer` reads the tokenizer alone (``PreTrainedTokenizerFast``, the
  ``tokenizers`` library) and the processor's chat template (``chat_template.jinja``, a legacy
  ``chat_template.json``, or the tokenizer config's);
- guidance-distilled: the transformer has a guidance embedding and is given the pipeline's
  default ``guidance_scale`` 4.0.

Layouts: ``Flux2Pipeline`` folders, ``transformer/`` folders, a one-file transformer in BFL's
naming (``flux2-dev.safetensors``, optionally under ``model.diffusion_model.``; diffusers'
converter with the base folder's config, read as Klein's are:
:func:`cgidm_core.models.flux2.load_bfl_transformer_file`), LoRAs through diffusers' Flux.2
loader (diffusers/peft, ai-toolkit ``diffusion_model.double_blocks.*`` and musubi-tuner /
sd-scripts ``lora_unet_double_blocks_*`` naming, the last two converted by diffusers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cgidm_core.errors import ModelFormatError, UnsupportedModelFamilyError
from cgidm_core.key_signatures import is_flux2_dev_file
from cgidm_core.models.flow import FlowMatchingPair
from cgidm_core.models.flux2 import (
    TRANSFORMER_CLASS,
    _Flux2Conditioning,
    load_bfl_transformer_file,
    load_flux2_vae,
    stack_hidden_states,
)
from cgidm_core.models.formats import SUPPORTED_HINT, read_json
from cgidm_core.models.sd_loading import LoadOptions, loading_errors
from cgidm_core.models.stable_diffusion import StableDiffusionLoraPair, StableDiffusionPair
from cgidm_core.models.transformer_adapter import (
    TransformerAdapter,
    TransformerBase,
    TransformerFamily,
    base_transformer,
    flow_scheduler_config,
    load_model_type_encoder,
    require_pipeline_parts,
)
from cgidm_core.names import FLUX2_DEV_FAMILY

PIPELINE_CLASS = "Flux2Pipeline"
TEXT_TOKENS = 512
#: Mistral-3 layers whose hidden states the pipeline stacks (``text_encoder_out_layers``).
TEXT_LAYERS = (10, 20, 30)
#: ``Flux2Pipeline.__call__``'s default ``guidance_scale``.
GUIDANCE = 4.0


def flux2_dev_pipeline_family(folder: Path, name: str, index: dict[str, Any]) -> str:
    """``flux2-dev`` for a ``Flux2Pipeline`` folder with a guidance-distilled
    ``Flux2Transformer2DModel``; anything else the table gave here is refused by name."""
    config_file = folder / "transformer" / "config.json"
    transformer = read_json(config_file) if config_file.is_file() else {}
    found = transformer.get("_class_name", TRANSFORMER_CLASS)
    problem = (f"is a {name} model" if name != PIPELINE_CLASS else
               f"holds a {found}, not a {TRANSFORMER_CLASS}" if found != TRANSFORMER_CLASS else
               f"is a {name} model whose transformer has no guidance embedding (a Klein "
               "transformer?)" if not transformer.get("guidance_embeds", True) else "")
    if problem:
        raise UnsupportedModelFamilyError(
            f"{folder} {problem}: of Flux.2 cgidm supports {PIPELINE_CLASS} (dev, "
            "guidance-distilled) and Flux2KleinPipeline (Klein). " + SUPPORTED_HINT)
    require_pipeline_parts(folder, name, index)
    return FLUX2_DEV_FAMILY


# -- the text path -------------------------------------------------------------------------------


def processor_chat_template(folder: Path, tokenizer: Any) -> str:
    """The chat template the Pixtral processor of ``folder`` would apply: its
    ``chat_template.jinja``, else a legacy ``chat_template.json``, else the tokenizer's own."""
    jinja, legacy = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if legacy.is_file():
        template = json.loads(legacy.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        return tokenizer.chat_template
    raise ModelFormatError(f"{folder} has no chat template (chat_template.jinja, "
                           "chat_template.json or tokenizer_config.json's chat_template); "
                           "Flux.2 dev formats its prompts with Mistral's")


def load_mistral_tokenizer(folder: Path, opts: LoadOptions) -> Any:
    """The pipeline folder's ``tokenizer/`` (a Pixtral processor folder) as the tokenizer alone,
    its ``chat_template`` set to the processor's. No image processor, so no torchvision."""
    from transformers import PreTrainedTokenizerFast

    component = folder / "tokenizer"
    if not (component / "tokenizer.json").is_file():
        raise ModelFormatError(f"{component} has no tokenizer.json; Flux.2 dev's tokenizer "
                               "folder holds Mistral's fast tokenizer")
    with loading_errors("the tokenizer", component):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(
            component, local_files_only=opts.local_files_only)
    tokenizer.chat_template = processor_chat_template(component, tokenizer)
    return tokenizer


def mistral_prompt_tokens(tokenizer: Any, prompt: str) -> Any:
    """``input_ids`` and ``attention_mask`` (1 x 512) of ``prompt`` as ``Flux2Pipeline`` gets
    them from its processor: the pipeline's conversation, the processor's template and its rule
    for special tokens."""
    from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

    conversation = format_input(prompts=[prompt], system_message=SYSTEM_MESSAGE)[0]
    text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                         add_generation_prompt=False)
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos is not None and text.startswith(bos)),
                     padding="max_length", truncation=True, max_length=TEXT_TOKENS,
                     return_tensors="pt")


# -- the pair ------------------------------------------------------------------------------------


class _Flux2DevConditioning(_Flux2Conditioning):
    """Flux.2 dev's text path, stacked layers and guidance on Klein's codec and prediction."""

    family = FLUX2_DEV_FAMILY
    variant = "dev"
    text_layers = TEXT_LAYERS
    guidance = GUIDANCE

    def _embed(self, tokenizer: Any, text_encoder: torch.nn.Module, prompt: str) -> torch.Tensor:
        del tokenizer  # both models read the base's tokenizer
        tokens = mistral_prompt_tokens(self.tokenizer, prompt)
        with torch.no_grad():
            out = text_encoder(input_ids=tokens.input_ids.to(self.device),
                               attention_mask=tokens.attention_mask.to(self.device),
                               output_hidden_states=True, use_cache=False)
        return stack_hidden_states(out, self.text_layers, self.dtype)


class Flux2DevPair(_Flux2DevConditioning, FlowMatchingPair, StableDiffusionPair):
    """A Flux.2 dev base and a fine-tune (pipeline folder, ``transformer/`` folder, one file)."""


class Flux2DevLoraPair(_Flux2DevConditioning, FlowMatchingPair, StableDiffusionLoraPair):
    """A Flux.2 dev base and a LoRA of it: ONE transformer, adapter on and off."""


# -- loading -------------------------------------------------------------------------------------


def load_mistral3(folder: Path, opts: LoadOptions) -> Any:
    return load_model_type_encoder(folder, opts, model_type="mistral3",
                                   class_name="Mistral3ForConditionalGeneration",
                                   expected="the Mistral-3 encoder Flux.2 dev uses")


def load_single_file(path: Path, config_folder: Path, opts: LoadOptions) -> Any:
    return load_bfl_transformer_file(
        SPEC, path, config_folder, opts, recognised=is_flux2_dev_file,
        missing="Flux.2 dev transformer (no double_stream_modulation_img.* / guidance_in.* "
                "tensors); the pretrained model is Flux.2 dev")


#: Fine-tuned text encoders are not read: both models are conditioned by the base's Mistral-3
#: (Flux.2 fine-tunes train the transformer).
SPEC = TransformerFamily(
    family=FLUX2_DEV_FAMILY, title="Flux.2 dev", pipeline_class=PIPELINE_CLASS,
    transformer_class=TRANSFORMER_CLASS, text_encoder=load_mistral3,
    single_file=load_single_file, reads_finetuned_encoder=False,
    no_own_encoder="a Flux.2 dev fine-tune has no text encoder of its own here",
    architecture=("in_channels", "num_layers", "num_single_layers", "attention_head_dim",
                  "num_attention_heads", "joint_attention_dim", "guidance_embeds"))


def load_flux2_dev_base(folder: Path, opts: LoadOptions, transformer_file: Path | None = None
                        ) -> TransformerBase:
    base = TransformerBase(
        folder=folder, transformer=base_transformer(SPEC, folder, opts, transformer_file),
        vae=load_flux2_vae(folder, opts), text_encoder=load_mistral3(folder, opts),
        tokenizer=load_mistral_tokenizer(folder, opts),
        scheduler_config=flow_scheduler_config(folder, "Flux.2 dev"))
    config = base.transformer.config
    text = base.text_encoder.config.text_config
    width = len(TEXT_LAYERS) * text.hidden_size
    latent = int(base.vae.config.latent_channels)
    if text.num_hidden_layers < max(TEXT_LAYERS) or not config.guidance_embeds or (
            config.joint_attention_dim, config.in_channels) != (width, latent):
        raise UnsupportedModelFamilyError(
            f"{folder}: the transformer (guidance_embeds={config.guidance_embeds}) expects "
            f"{config.joint_attention_dim}-dim text features and {config.in_channels} latent "
            f"channels, but Mistral-3 ({text.num_hidden_layers} layers) gives {width} from "
            f"layers {TEXT_LAYERS} and the VAE {latent}: not a Flux.2 dev layout")
    return base


ADAPTER = TransformerAdapter(
    SPEC, pipeline_family=flux2_dev_pipeline_family, load_base=load_flux2_dev_base,
    pair=Flux2DevPair, lora_pair=Flux2DevLoraPair)


# -- the family registry's adapter interface (``cgidm_core.families.FamilyAdapter``, #23) ---------


check_pipeline_folder = ADAPTER.check_pipeline_folder
load_pair = ADAPTER.load_pair
load_lora_base = ADAPTER.load_lora_base
