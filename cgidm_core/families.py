"""The family registry: every model family cgidm loads, one entry each, in one table.

In the spirit of diffusers' ``AUTO_*_PIPELINES_MAPPING`` and its single-file
``CHECKPOINT_KEY_NAMES``: an entry says how a family is recognised (pipeline folder class,
denoiser config class, single-file / LoRA / bare-denoiser key signatures, trainer metadata), how
it loads (the layouts of a pretrained model and of a fine-tune, and which layouts the service
takes as uploads), what its pair computes (noise or flow objective, text or no conditioning,
the :class:`~cgidm_core.pair.ModelPair` classes), its defaults (GPU dtype, usual resolution, time
shift, guidance, where the trigger prompt comes from) and its memory model; and it names the ONE
adapter module that loads it (:class:`FamilyAdapter`).

Everything that has to tell families apart reads this table: ``load_pair`` and ``cgidm check``
(through :mod:`cgidm_core.models.loading` and :mod:`cgidm_core.models.formats`), the worker and
the gateway's upload check (:func:`cgidm.model_files.classify`), the memory model
(:mod:`cgidm_core.models.devices`), ``cgidm models --families`` and docs/FAMILIES.md. Adding a
family is one adapter module and one :class:`Family` entry in :data:`FAMILIES`
(docs/FAMILIES.md, "Adding a family").

This module imports only the standard library and the torch-free name rules
(:mod:`cgidm_core.key_signatures`): the gateway, which never imports torch, reads it too.
Adapters are imported only when a pair of their family is loaded.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cgidm_core import key_signatures as keys_
from cgidm_core.names import (
    CHROMA_FAMILY,
    DDPM_FAMILY,
    FLUX2_DEV_FAMILY,
    FLUX2_FAMILY,
    FLUX_FAMILY,
    HIDREAM_FAMILY,
    PIXEL_FLOW_FAMILY,
    QWEN_IMAGE_FAMILY,
    SD3_FAMILY,
    SD_FAMILY,
    SDXL_FAMILY,
    ZIMAGE_FAMILY,
)

if TYPE_CHECKING:
    from cgidm_core.models.adapter import PairRequest
    from cgidm_core.pair import ModelPair

#: A rule on a safetensors file's tensor names (header only, no weights read).
KeyRule = Callable[[list[str]], bool]

#: Fine-tune layouts (``--finetuned-kind``), as :func:`cgidm_core.models.formats.
#: detect_finetuned_kind` names them.
LATENT_LAYOUTS: tuple[str, ...] = ("pipeline", "dreambooth", "lora", "single_file", "unet")
PIXEL_LAYOUTS: tuple[str, ...] = ("ddpm", "unet", "lora")
#: The pixel LoRA namings (cgidm_core.pixel_lora writes both), attached unmerged as a peft adapter.
PIXEL_LORA_FORMATS: tuple[str, ...] = ("diffusers/peft (unet.*.lora_A/B)", "kohya-ss (lora_unet_*)")


@dataclass(frozen=True)
class Recognition:
    """How files of a family are told apart, from JSON configs and safetensors names only.

    Tables are read in :data:`FAMILIES` order (first match wins), after :data:`REFUSED`.
    """

    #: ``model_index.json`` ``_class_name`` patterns (``fnmatch``) of its pipeline folders.
    pipeline_classes: tuple[str, ...] = ()
    #: A pipeline folder whose index lists any of these components is this family's whatever
    #: its class (SDXL: ``text_encoder_2``, which SD 1.x/2.x never has).
    pipeline_components: tuple[str, ...] = ()
    #: The class pattern claims a folder only when its index lists all of these ...
    pipeline_requires: tuple[str, ...] = ()
    #: ... and none of these.
    pipeline_excludes: tuple[str, ...] = ()
    #: Pixel pipelines of both objectives share one class: the scheduler class tells them
    #: apart (the family's :attr:`Family.objective` must match the saved scheduler's).
    objective_from_scheduler: bool = False
    #: ``config.json`` ``_class_name`` patterns of its denoiser (``unet/``, ``transformer/`` or a
    #: bare folder): what a fine-tuned denoiser folder of this family holds.
    denoiser_classes: tuple[str, ...] = ()
    #: A fine-tune saved as one file in the layout its trainers publish.
    single_file: KeyRule | None = None
    #: A LoRA of this family (any naming its loader converts).
    lora: KeyRule | None = None
    #: Bare denoiser weights in diffusers naming (fine-tune kind ``unet``).
    denoiser_file: KeyRule | None = None
    #: A pretrained model given as one file, and what that file holds: ``"complete"`` (every
    #: part, converted once into a pipeline folder) or ``"denoiser"`` (the denoiser only; the
    #: rest comes from a pipeline folder given as ``pretrained_config``).
    base_file: KeyRule | None = None
    base_file_layout: str | None = None
    #: Trainer metadata keys in a safetensors header that the adapter reads (kohya-ss
    #: ``ss_*``, ai-toolkit, ...), for the docs and ``cgidm models --families``.
    metadata_keys: tuple[str, ...] = ()
    #: How trainers name this family's architecture in a file's header (``modelspec.
    #: architecture``, ``ss_base_model_version``, ``base_model``, ``ss_sd_model_name``):
    #: regular expressions searched in the value lowercased with everything but letters and
    #: digits removed ("Flux.2-klein-4b/lora" -> "flux2klein4blora"). A LoRA whose header names
    #: only other families' architectures is refused for this family's base
    #: (:mod:`cgidm_core.family_evidence`): its tensor names may fit several transformers.
    trained_for: tuple[str, ...] = ()


@dataclass(frozen=True)
class Defaults:
    """What a pair of this family uses when the caller says nothing."""

    #: dtype on a GPU when the caller asks for "auto" (a CPU always computes in float32).
    gpu_dtype: str = "float16"
    #: The side (pixels) images are checked at; the pair reads the exact one from its configs.
    resolution: int = 512
    #: Where the flow-matching time shift comes from ("" for noise-prediction families).
    time_shift: str = ""
    #: Guidance given to a guidance-distilled denoiser, and where it comes from ("" if none).
    guidance: str = ""
    #: Where the trigger prompt comes from when the caller gives none ("" for unconditional).
    prompt_source: str = ""


@dataclass(frozen=True)
class MemoryModel:
    """Saved-for-backward bytes of ONE denoiser pass of one image in a 2-byte dtype, counted on
    the meta device by ``benchmarks/activations.py`` for the family's released denoiser (the
    largest variant users bring: SD 3.5 large, Flux.2 Klein 9B): ``{(side, checkpointing):
    bytes}`` at the native side and at half of it; the latent pixels at the native side; the
    denoiser's parameter count (its weights, for ``benchmarks/family_memory.py``'s table of
    what fits a card). Batch sizes and the checkpointing decision follow from it
    (:mod:`cgidm_core.models.devices`)."""

    activation_counts: dict[tuple[int, bool], int]
    native_latent_pixels: int
    denoiser_parameters: int = 0
    #: ``""``: counted for this family's own denoiser. Otherwise the family whose counts stand
    #: in (none does at present: every entry is counted).
    borrowed_from: str = ""
    #: What the count assumes (variant, text length), for ``cgidm models --families``.
    note: str = ""


@dataclass(frozen=True)
class Family:
    """One registry entry: everything that differs between families, and the adapter."""

    #: ``ModelPair.family`` and the registry key.
    name: str
    #: Shown to users ("Stable Diffusion 1.x/2.x").
    title: str
    #: Dotted path of the adapter module (a :class:`FamilyAdapter`).
    adapter: str
    #: ``"noise"`` (epsilon / v-prediction with a DDPM schedule) or ``"flow"`` (velocity).
    objective: str
    #: ``"text"`` or ``"none"``.
    conditioning: str
    #: ``"latent"`` (a VAE) or ``"pixel"``.
    space: str
    #: Dotted paths of the pair classes the adapter builds (full fine-tune, LoRA).
    pair_classes: tuple[str, ...]
    recognition: Recognition
    #: Fine-tune layouts the adapter loads (subset of ``FINETUNED_KINDS``).
    finetuned_layouts: tuple[str, ...]
    #: Pretrained layouts, for the docs ("pipeline folder", "single file", ...).
    pretrained_layouts: tuple[str, ...]
    #: The LoRA namings its adapter converts (what trainers publish), for users and the docs.
    lora_formats: tuple[str, ...] = ()
    #: Upload kinds the service accepts against a base of this family (``()``: none yet).
    upload_kinds: tuple[str, ...] = ()
    defaults: Defaults = field(default_factory=Defaults)
    memory: MemoryModel | None = None
    #: One line for ``cgidm models --families``: what a user can bring.
    summary: str = ""


@dataclass(frozen=True)
class RefusedFamily:
    """A family recognised in order to be refused by name, with what to do instead."""

    name: str
    title: str
    message: str
    recognition: Recognition


class FamilyAdapter(Protocol):
    """What an adapter module provides: module-level functions with these signatures.

    The generic path (:func:`cgidm_core.models.loading.load_pair_from_paths`) has, before it
    calls the adapter: resolved both references to paths, found the family of the pretrained
    model from this table, converted or split a pretrained single file (``base_file_layout``),
    detected the fine-tune's layout and refused a fine-tune whose files another family claims.
    The adapter loads, checks the two models fit, and returns the pair; it reads the trigger
    prompt afterwards only for ``conditioning == "text"`` families.

    Optional: ``load_lora_base(BaseRequest) -> LoraBase`` (:mod:`cgidm_core.models.adapter`), a
    base kept loaded to which the family's LoRA files are attached one at a time, each as the
    pair ``load_pair`` would build, and removed again. An audit swaps the LoRAs of a family that
    has it on one loaded base (:mod:`cgidm_core.lora_swap`); a family without it loads a pair per
    LoRA.
    """

    def check_pipeline_folder(self, folder: Path, index: dict[str, Any]) -> None:
        """Refuse, by name and before any weight is read, a pipeline folder this table gave to
        the family but the adapter cannot load (the SDXL refiner, Flux Fill, inpainting UNets,
        a folder missing parts). Raises ``UnsupportedModelFamilyError``/``ModelFormatError``."""

    def load_pair(self, request: PairRequest) -> ModelPair:
        """Load both models (frozen, eval mode, on ``request.opts.device``) as one pair."""


#: Families recognised only to be refused by name, with what to do instead (Stable Diffusion
#: 3 / 3.5 was here until its adapter, ``cgidm_core.models.sd3``, came; the variants an adapter
#: cannot load are refused by that adapter). docs/FAMILIES.md says why each is refused.
REFUSED: tuple[RefusedFamily, ...] = (
    RefusedFamily(
        name=HIDREAM_FAMILY,
        title="HiDream-I1",
        message=(
            "HiDream-I1 is not supported: it is conditioned by four text encoders at once "
            "(CLIP-L, CLIP-G, T5-XXL and Llama-3.1-8B-Instruct, about 15B parameters of "
            "encoders next to a 17B sparse mixture-of-experts transformer), which cgidm has "
            "neither an adapter nor a tested reference for. Check a fine-tune of a supported "
            "family instead (`cgidm models --families`), or ask for HiDream support with the "
            "model's name (docs/FAMILIES.md says what it would take)"),
        recognition=Recognition(
            pipeline_classes=("HiDreamImage*",),
            denoiser_classes=("HiDreamImageTransformer2DModel",),
            single_file=keys_.is_hidream_file, lora=keys_.is_hidream_lora,
        ),
    ),
)

#: Fine-tune layouts of the diffusion-transformer families (no bare-weights ``unet`` layout).
TRANSFORMER_LAYOUTS: tuple[str, ...] = ("pipeline", "dreambooth", "lora", "single_file")
_FROM_CONFIG_SHIFT = "the scheduler config's (fixed, or mu from the token count where it asks " \
                     "for dynamic shifting)"
_ONE_FILE = "single-file transformer + --pretrained-config pipeline folder"

_KOHYA_PROMPT = ("kohya-ss ss_tag_frequency / ss_output_name in the safetensors header, else "
                 "instance_prompt or trigger words in a README.md model card")

FAMILIES: tuple[Family, ...] = (
    Family(
        name=DDPM_FAMILY,
        title="pixel-space DDPM",
        adapter="cgidm_core.models.ddpm_adapter",
        objective="noise", conditioning="none", space="pixel",
        pair_classes=("cgidm_core.models.ddpm.DDPMPair",
                      "cgidm_core.models.pixel_lora_loading.DDPMLoraPair"),
        recognition=Recognition(
            pipeline_classes=("DDPMPipeline", "DDIMPipeline"), objective_from_scheduler=True,
            denoiser_classes=("UNet2DModel",), denoiser_file=keys_.is_pixel_unet_file,
            lora=keys_.is_pixel_lora,
        ),
        finetuned_layouts=PIXEL_LAYOUTS,
        pretrained_layouts=("DDPMPipeline folder",),
        lora_formats=PIXEL_LORA_FORMATS,
        # a LoRA upload is swapped on the worker's loaded base in audits (worker/audit_swap.py)
        upload_kinds=("unet", "lora"),
        defaults=Defaults(gpu_dtype="float16", resolution=32),
        summary="unconditional pixel UNet2DModel (the demo pair); fine-tunes as pipeline "
                "folders, UNet folders, bare UNet weights or LoRA files (attached unmerged)",
    ),
    Family(
        name=PIXEL_FLOW_FAMILY,
        title="pixel-space flow-matching model",
        adapter="cgidm_core.models.pixel_flow_adapter",
        objective="flow", conditioning="none", space="pixel",
        pair_classes=("cgidm_core.models.pixel_flow.PixelFlowPair",
                      "cgidm_core.models.pixel_lora_loading.PixelFlowLoraPair"),
        recognition=Recognition(
            pipeline_classes=("DDPMPipeline", "DDIMPipeline"), objective_from_scheduler=True,
            denoiser_classes=("UNet2DModel",), denoiser_file=keys_.is_pixel_unet_file,
            lora=keys_.is_pixel_lora,
        ),
        finetuned_layouts=PIXEL_LAYOUTS,
        lora_formats=PIXEL_LORA_FORMATS,
        upload_kinds=("lora",),
        pretrained_layouts=("DDPMPipeline folder with a FlowMatchEulerDiscreteScheduler",),
        defaults=Defaults(gpu_dtype="float16", resolution=32,
                          time_shift="PIXEL_FLOW_INVERSION_SHIFT (measured); the scheduler's "
                                     "fixed shift only says how the model is sampled"),
        summary="unconditional pixel UNet2DModel trained by flow matching (the flow demo pair)",
    ),
    Family(
        name=FLUX2_DEV_FAMILY,
        title="Flux.2 dev",
        adapter="cgidm_core.models.flux2_dev",
        objective="flow", conditioning="text", space="latent",
        pair_classes=("cgidm_core.models.flux2_dev.Flux2DevPair",
                      "cgidm_core.models.flux2_dev.Flux2DevLoraPair"),
        recognition=Recognition(
            pipeline_classes=("Flux2Pipeline",), denoiser_classes=("Flux2Transformer2DModel",),
            single_file=keys_.is_flux2_dev_file, lora=keys_.is_flux2_lora,
            base_file=keys_.is_flux2_dev_file, base_file_layout="denoiser",
            metadata_keys=("ss_tag_frequency", "ss_output_name"),
            trained_for=(r"flux2dev", r"^flux2(lora)?$"),
        ),
        finetuned_layouts=TRANSFORMER_LAYOUTS,
        lora_formats=("diffusers/peft (transformer.*)",
                      "ai-toolkit (diffusion_model.double_blocks.*, BFL names)",
                      "musubi-tuner / sd-scripts (lora_unet_double_blocks_*)"),
        pretrained_layouts=("Flux2Pipeline folder (FLUX.2-dev; its Pixtral processor read as "
                            "the tokenizer alone)", _ONE_FILE + " (BFL naming)"),
        defaults=Defaults(
            gpu_dtype="bfloat16", resolution=1024,
            time_shift="exp(compute_empirical_mu(tokens, 50)): Flux2Pipeline's rule at its "
                       "default 50 steps",
            guidance="4.0, Flux2Pipeline's default guidance_scale (guidance-distilled)",
            prompt_source=_KOHYA_PROMPT,
        ),
        memory=MemoryModel(
            activation_counts={(1024, False): 63_146_770_432, (1024, True): 3_227_746_304,
                               (512, False): 21_028_593_664, (512, True): 1_076_043_776},
            native_latent_pixels=64 * 64, denoiser_parameters=32_223_281_152,
            note="512 Mistral-3 tokens, guidance embedding",
        ),
        summary="Flux.2 dev; fine-tunes as pipeline folders, transformer/ folders, single-file "
                "transformers (BFL naming), LoRAs (diffusers/peft, ai-toolkit, musubi/kohya)",
    ),
    Family(
        name=FLUX2_FAMILY,
        title="Flux.2 Klein",
        adapter="cgidm_core.models.flux2",
        objective="flow", conditioning="text", space="latent",
        pair_classes=("cgidm_core.models.flux2.Flux2Pair", "cgidm_core.models.flux2.Flux2LoraPair"),
        recognition=Recognition(
            pipeline_classes=("Flux2*",), denoiser_classes=("Flux2Transformer2DModel",),
            single_file=keys_.is_flux2_klein_file, lora=keys_.is_flux2_lora,
            base_file=keys_.is_flux2_klein_file, base_file_layout="denoiser",
            metadata_keys=("ss_tag_frequency", "ss_output_name"),
            trained_for=(r"flux2klein", r"klein[49]b"),
        ),
        finetuned_layouts=TRANSFORMER_LAYOUTS,
        lora_formats=("diffusers/peft (transformer.*)",
                      "ai-toolkit / musubi-tuner names (diffusers' Flux.2 converters; tested on "
                      "Flux.2 dev)"),
        pretrained_layouts=("Flux2KleinPipeline folder", _ONE_FILE + " (BFL naming)"),
        upload_kinds=("lora", "single_file"),
        defaults=Defaults(
            gpu_dtype="bfloat16", resolution=1024,
            time_shift="exp(compute_empirical_mu(tokens, 50)): Flux2KleinPipeline's rule at its "
                       "default 50 steps",
            prompt_source=_KOHYA_PROMPT,
        ),
        memory=MemoryModel(
            activation_counts={(1024, False): 23_937_273_856, (1024, True): 1_245_872_128,
                               (512, False): 7_965_405_184, (512, True): 415_375_360},
            native_latent_pixels=64 * 64, denoiser_parameters=9_078_581_248,
            note="counted for Klein 9B; Klein 4B: 14.07 GB per pass at 1024 px, 3.88 B parameters",
        ),
        summary="Flux.2 Klein; fine-tunes as pipeline folders, transformer/ folders, single-file "
                "transformers (BFL naming, as BFL and ComfyUI publish them), LoRAs "
                "(diffusers/peft)",
    ),
    Family(
        name=FLUX_FAMILY,
        title="Flux.1",
        adapter="cgidm_core.models.flux_loading",
        objective="flow", conditioning="text", space="latent",
        pair_classes=("cgidm_core.models.flux.FluxPair", "cgidm_core.models.flux.FluxLoraPair"),
        recognition=Recognition(
            pipeline_classes=("Flux*",), denoiser_classes=("FluxTransformer2DModel",),
            single_file=keys_.is_flux_file, lora=keys_.is_flux_lora,
            base_file=keys_.is_flux_file, base_file_layout="denoiser",
            metadata_keys=("ss_tag_frequency", "ss_output_name", "ss_guidance_scale",
                           "ss_timestep_sampling", "ss_discrete_flow_shift"),
            trained_for=(r"flux1", r"^flux(lora)?$", r"fluxdev", r"fluxschnell"),
        ),
        finetuned_layouts=("pipeline", "dreambooth", "lora", "single_file"),
        lora_formats=("diffusers/peft (transformer.*)", "kohya-ss (lora_unet_double_blocks_*, "
                      "lora_te1_*)", "XLabs (double_blocks.N.processor.*)"),
        pretrained_layouts=("FluxPipeline folder (dev, schnell)",
                            "single-file transformer + --pretrained-config pipeline folder"),
        defaults=Defaults(
            gpu_dtype="bfloat16", resolution=1024,
            time_shift="the scheduler config's (dynamic, resolution-dependent for dev); a fixed "
                       "one from kohya ss_timestep_sampling / ss_discrete_flow_shift",
            guidance="3.5 for dev (guidance embedding), or kohya ss_guidance_scale; none for "
                     "schnell",
            prompt_source=_KOHYA_PROMPT,
        ),
        memory=MemoryModel(
            activation_counts={(1024, False): 21_615_259_648, (1024, True): 1_642_115_072,
                               (512, False): 7_196_397_568, (512, True): 547_377_152},
            native_latent_pixels=128 * 128, denoiser_parameters=11_901_408_320,
            note="FLUX.1-dev, 512 T5 tokens",
        ),
        summary="Flux.1 dev/schnell; fine-tunes as pipeline folders, transformer/ folders, "
                "single-file transformers (BFL or diffusers naming), LoRAs (diffusers/peft, "
                "kohya-ss, XLabs)",
    ),
    Family(
        name=CHROMA_FAMILY,
        title="Chroma",
        adapter="cgidm_core.models.chroma",
        objective="flow", conditioning="text", space="latent",
        pair_classes=("cgidm_core.models.chroma.ChromaPair",
                      "cgidm_core.models.chroma.ChromaLoraPair"),
        recognition=Recognition(
            pipeline_classes=("Chroma*",), denoiser_classes=("ChromaTransformer2DModel",),
            single_file=keys_.is_chroma_file, lora=keys_.is_flux_lora,
            base_file=keys_.is_chroma_file, base_file_layout="denoiser",
            metadata_keys=("ss_tag_frequency", "ss_output_name"),
            trained_for=(r"chroma",),
        ),
        finetuned_layouts=TRANSFORMER_LAYOUTS,
        lora_formats=("diffusers/peft (transformer.*)", "kohya-ss (lora_unet_double_blocks_*), "
                      "through diffusers' Flux.1 loader"),
        pretrained_layouts=("ChromaPipeline folder", _ONE_FILE),
        upload_kinds=("lora", "single_file"),
        defaults=Defaults(gpu_dtype="bfloat16", resolution=1024, time_shift=_FROM_CONFIG_SHIFT,
                          prompt_source=_KOHYA_PROMPT),
        memory=MemoryModel(
            activation_counts={(1024, False): 21_616_672_768, (1024, True): 1_645_623_296,
                               (512, False): 7_197_810_688, (512, True): 550_885_376},
            native_latent_pixels=128 * 128, denoiser_parameters=8_899_983_424,
        ),
        summary="Chroma; fine-tunes as pipeline folders, transformer/ folders, single-file "
                "transformers (distilled_guidance_layer.*), LoRAs (diffusers/peft, kohya-ss)",
    ),
    Family(
        name=SD3_FAMILY,
        title="Stable Diffusion 3.x",
        adapter="cgidm_core.models.sd3",
        objective="flow", conditioning="text", space="latent",
        pair_classes=("cgidm_core.models.sd3.SD3Pair", "cgidm_core.models.sd3.SD3LoraPair"),
        recognition=Recognition(
            pipeline_classes=("StableDiffusion3*",), denoiser_classes=("SD3Transformer2DModel",),
            single_file=keys_.is_sd3_file, lora=keys_.is_sd3_lora,
            base_file=keys_.is_sd3_file, base_file_layout="denoiser",
            metadata_keys=("ss_tag_frequency", "ss_output_name"),
            trained_for=(r"stablediffusion3", r"^sd3", r"sd35"),
        ),
        finetuned_layouts=TRANSFORMER_LAYOUTS,
        lora_formats=("diffusers/peft (transformer.*, text_encoder.*, text_encoder_2.*), as "
                      "diffusers' DreamBooth-LoRA script, SimpleTuner and ai-toolkit write them",
                      "kohya-ss sd3_train_network.py (lora_unet_joint_blocks_*, lora_te1_*, "
                      "lora_te2_*; converted by cgidm_core.models.sd3_kohya_lora, T5 layers "
                      "refused)"),
        pretrained_layouts=("StableDiffusion3Pipeline folder (3.0, 3.5 medium, 3.5 large)",
                            _ONE_FILE),
        upload_kinds=("lora", "single_file"),
        defaults=Defaults(gpu_dtype="bfloat16", resolution=1024,
                          time_shift="the scheduler config's (3.0 for SD 3.5, fixed)",
                          prompt_source=_KOHYA_PROMPT),
        memory=MemoryModel(
            activation_counts={(1024, False): 13_181_233_552, (1024, True): 839_110_656,
                               (512, False): 4_025_911_696, (512, True): 255_946_752},
            native_latent_pixels=128 * 128, denoiser_parameters=8_056_627_520,
            note="counted for SD 3.5 large; 3.5 medium: 6.91 GB per pass at 1024 px, "
                 "2.24 B parameters",
        ),
        summary="Stable Diffusion 3 / 3.5 medium and large; fine-tunes as pipeline folders, "
                "transformer/ folders, single-file transformers (Stability or diffusers "
                "naming), LoRAs (diffusers/peft, kohya-ss)",
    ),
    Family(
        name=ZIMAGE_FAMILY,
        title="Z-Image",
        adapter="cgidm_core.models.zimage",
        objective="flow", conditioning="text", space="latent",
        pair_classes=("cgidm_core.models.zimage.ZImagePair",
                      "cgidm_core.models.zimage.ZImageLoraPair"),
        recognition=Recognition(
            pipeline_classes=("ZImage*",), denoiser_classes=("ZImageTransformer2DModel",),
            single_file=keys_.is_zimage_file, lora=keys_.is_zimage_lora,
            base_file=keys_.is_zimage_file, base_file_layout="denoiser",
            metadata_keys=("ss_tag_frequency", "ss_output_name"),
            trained_for=(r"zimage",),
        ),
        finetuned_layouts=TRANSFORMER_LAYOUTS,
        lora_formats=("diffusers/peft (transformer.*)", "ComfyUI / ai-toolkit (diffusion_model.*)",
                      "musubi-tuner / kohya (lora_unet_*; diffusers' converter, untested)"),
        pretrained_layouts=("ZImagePipeline folder (Turbo)", _ONE_FILE),
        upload_kinds=("lora", "single_file"),
        defaults=Defaults(gpu_dtype="bfloat16", resolution=1024,
                          time_shift=_FROM_CONFIG_SHIFT + "; 3.0 fixed for Z-Image-Turbo",
                          prompt_source=_KOHYA_PROMPT),
        memory=MemoryModel(
            activation_counts={(1024, False): 33_833_868_800, (1024, True): 1_172_619_264,
                               (512, False): 11_120_898_560, (512, True): 390_878_208},
            native_latent_pixels=128 * 128, denoiser_parameters=6_154_908_736,
            note="512 caption tokens, the pipeline's maximum: a shorter prompt needs less",
        ),
        summary="Z-Image (Turbo); fine-tunes as pipeline folders, transformer/ folders, "
                "single-file transformers (ComfyUI naming), LoRAs (diffusers/peft, ComfyUI, "
                "ai-toolkit)",
    ),
    Family(
        name=QWEN_IMAGE_FAMILY,
        title="Qwen-Image",
        adapter="cgidm_core.models.qwen_image",
        objective="flow", conditioning="text", space="latent",
        pair_classes=("cgidm_core.models.qwen_image.QwenImagePair",
                      "cgidm_core.models.qwen_image.QwenImageLoraPair"),
        recognition=Recognition(
            pipeline_classes=("QwenImage*",), denoiser_classes=("QwenImageTransformer2DModel",),
            single_file=keys_.is_qwen_image_file, lora=keys_.is_qwen_image_lora,
            base_file=keys_.is_qwen_image_file, base_file_layout="denoiser",
            metadata_keys=("ss_tag_frequency", "ss_output_name"),
            trained_for=(r"qwenimage",),
        ),
        finetuned_layouts=TRANSFORMER_LAYOUTS,
        lora_formats=("diffusers/peft (transformer.*)", "ComfyUI / ai-toolkit (diffusion_model.*)",
                      "kohya (lora_unet_*; diffusers' converter, untested)"),
        pretrained_layouts=("QwenImagePipeline folder (and 2512)", _ONE_FILE),
        upload_kinds=("lora", "single_file"),
        defaults=Defaults(gpu_dtype="bfloat16", resolution=1024,
                          time_shift="the scheduler config's dynamic shift (mu from the token "
                                     "count, base 0.5, max 0.9)",
                          prompt_source=_KOHYA_PROMPT),
        memory=MemoryModel(
            activation_counts={(1024, False): 27_276_308_480, (1024, True): 1_723_904_512,
                               (512, False): 9_080_410_112, (512, True): 572_543_488},
            native_latent_pixels=128 * 128, denoiser_parameters=20_430_401_088,
            note="512 prompt tokens, the pipeline's maximum: a shorter prompt needs less",
        ),
        summary="Qwen-Image; fine-tunes as pipeline folders, transformer/ folders, single-file "
                "transformers, LoRAs (diffusers/peft, ComfyUI, ai-toolkit)",
    ),
    Family(
        name=SDXL_FAMILY,
        title="SDXL",
        adapter="cgidm_core.models.sdxl_loading",
        objective="noise", conditioning="text", space="latent",
        pair_classes=("cgidm_core.models.sdxl.StableDiffusionXLPair",
                      "cgidm_core.models.sdxl.StableDiffusionXLLoraPair"),
        recognition=Recognition(
            pipeline_classes=("StableDiffusionXL*",), pipeline_components=("text_encoder_2",),
            denoiser_classes=("UNet2DConditionModel",),
            single_file=keys_.is_ldm_single_file, lora=keys_.is_unet_lora,
            denoiser_file=keys_.is_text_conditioned_unet_file,
            base_file=keys_.is_complete_sdxl_checkpoint, base_file_layout="complete",
            metadata_keys=("ss_tag_frequency", "ss_output_name"),
            trained_for=(r"sdxl", r"stablediffusionxl"),
        ),
        finetuned_layouts=LATENT_LAYOUTS,
        lora_formats=("diffusers/peft", "kohya-ss (lora_unet_* SGM names, lora_te1_*, "
                      "lora_te2_*)"),
        pretrained_layouts=("StableDiffusionXLPipeline folder (base 1.0)",
                            "complete single-file checkpoint (SGM layout)"),
        upload_kinds=("lora", "single_file", "unet"),
        defaults=Defaults(gpu_dtype="float16", resolution=1024, prompt_source=_KOHYA_PROMPT),
        memory=MemoryModel(
            activation_counts={(1024, False): 5_336_636_160, (1024, True): 503_767_296,
                               (512, False): 1_353_382_656, (512, True): 126_181_632},
            native_latent_pixels=128 * 128, denoiser_parameters=2_567_463_684,
        ),
        summary="SDXL base 1.0 and its fine-tunes (pipeline, DreamBooth unet/ + text encoders, "
                "LoRA in diffusers or kohya naming, SGM single file, bare UNet weights)",
    ),
    Family(
        name=SD_FAMILY,
        title="Stable Diffusion 1.x/2.x",
        adapter="cgidm_core.models.sd_loading",
        objective="noise", conditioning="text", space="latent",
        pair_classes=("cgidm_core.models.stable_diffusion.StableDiffusionPair",
                      "cgidm_core.models.stable_diffusion.StableDiffusionLoraPair"),
        recognition=Recognition(
            pipeline_classes=("StableDiffusion*",),
            pipeline_requires=("unet", "vae", "text_encoder", "tokenizer"),
            pipeline_excludes=("transformer",),
            denoiser_classes=("UNet2DConditionModel",),
            single_file=keys_.is_sd_single_file, lora=keys_.is_sd_lora,
            denoiser_file=keys_.is_sd_unet_file,
            base_file=keys_.is_complete_sd_checkpoint, base_file_layout="complete",
            metadata_keys=("ss_tag_frequency", "ss_output_name"),
            trained_for=(r"^sdv?[12]", r"stablediffusionv?[12]"),
        ),
        finetuned_layouts=LATENT_LAYOUTS,
        lora_formats=("diffusers/peft", "kohya-ss / A1111 (lora_unet_*, lora_te_*)"),
        pretrained_layouts=("StableDiffusionPipeline folder",
                            "complete single-file checkpoint (LDM layout)"),
        upload_kinds=("lora", "single_file", "unet"),
        defaults=Defaults(gpu_dtype="float16", resolution=512, prompt_source=_KOHYA_PROMPT),
        memory=MemoryModel(
            activation_counts={(512, False): 774_828_928, (512, True): 154_657_152,
                               (256, False): 196_595_968, (256, True): 38_756_736},
            native_latent_pixels=64 * 64, denoiser_parameters=859_520_964,
        ),
        summary="Stable Diffusion 1.x/2.x (and the latent demo pair); fine-tunes as pipeline "
                "folders, DreamBooth unet/ (+text_encoder/), LoRA (diffusers/peft, kohya, "
                "A1111), LDM single files, bare UNet weights",
    ),
)

_BY_NAME = {family.name: family for family in FAMILIES}


# -- lookups -----------------------------------------------------------------------------------


def get(name: str) -> Family:
    """The entry of family ``name``; KeyError names the registered ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no family {name!r} in the registry (registered: "
                       f"{', '.join(_BY_NAME)})") from None


def find(name: str) -> Family | None:
    return _BY_NAME.get(name)


def title(name: str) -> str:
    """A family's name for users (the registry id itself when it is not registered)."""
    entry = _BY_NAME.get(name)
    if entry is not None:
        return entry.title
    refused = next((r for r in REFUSED if r.name == name), None)
    return refused.title if refused is not None else name


def adapter(family: Family) -> FamilyAdapter:
    """The family's adapter module, imported now (it may import torch and diffusers)."""
    return importlib.import_module(family.adapter)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def refused_pipeline(class_name: str) -> RefusedFamily | None:
    return next((r for r in REFUSED if _matches(class_name, r.recognition.pipeline_classes)),
                None)


def refused_denoiser(class_name: str) -> RefusedFamily | None:
    return next((r for r in REFUSED if _matches(class_name, r.recognition.denoiser_classes)),
                None)


def refused_file(keys: list[str]) -> RefusedFamily | None:
    return next((r for r in REFUSED if r.recognition.single_file is not None
                 and r.recognition.single_file(keys)), None)


def refused_lora(keys: list[str]) -> RefusedFamily | None:
    """The refused family a LoRA file is of, by its tensor names (before the registered
    families' broader LoRA rules, which may claim its ``transformer.*`` names too)."""
    return next((r for r in REFUSED if r.recognition.lora is not None
                 and r.recognition.lora(keys)), None)


def pipeline_claim(class_name: str, index: dict[str, Any],
                   objective: Callable[[], str]) -> Family | None:
    """The family a pipeline folder belongs to by its ``model_index.json`` (``objective()``
    reads the scheduler's objective, for families that need it), or ``None``."""
    for family in FAMILIES:
        rule = family.recognition
        claimed = _matches(class_name, rule.pipeline_classes) and all(
            part in index for part in rule.pipeline_requires) and not any(
            part in index for part in rule.pipeline_excludes)
        claimed = claimed or any(part in index for part in rule.pipeline_components)
        if claimed and (not rule.objective_from_scheduler or objective() == family.objective):
            return family
    return None


def pipeline_class_claims(class_name: str) -> list[Family]:
    """The families whose pipeline class patterns match ``class_name`` (both pixel families
    share ``DDPMPipeline``), without reading the folder."""
    return [f for f in FAMILIES if _matches(class_name, f.recognition.pipeline_classes)]


def denoiser_claims(class_name: str) -> list[Family]:
    """The families whose denoiser has this config class (SD and SDXL share one)."""
    return [f for f in FAMILIES if _matches(class_name, f.recognition.denoiser_classes)]


def file_claims(keys: list[str], kind: str) -> list[Family]:
    """The families a fine-tune file of layout ``kind`` (``lora``, ``single_file``, ``unet``)
    can belong to, by its tensor names; several when the names cannot tell (an SD and an SDXL
    LoRA without second-encoder layers)."""
    attribute = {"lora": "lora", "single_file": "single_file", "unet": "denoiser_file"}[kind]
    out = []
    for family in FAMILIES:
        rule = getattr(family.recognition, attribute)
        if rule is not None and rule(keys):
            out.append(family)
    return out


def base_file_claim(keys: list[str]) -> Family | None:
    """The family of a pretrained model given as one file, by its tensor names."""
    return next((f for f in FAMILIES if f.recognition.base_file is not None
                 and f.recognition.base_file(keys)), None)


def families_taking_uploads() -> list[Family]:
    return [family for family in FAMILIES if family.upload_kinds]


def supported_hint() -> str:
    """One sentence listing what the registry loads, for refusals."""
    return "cgidm supports " + "; ".join(
        f"{family.title} ({', '.join(family.pretrained_layouts)})" for family in FAMILIES
    ) + ". See `cgidm models --families`"


def describe() -> list[dict[str, Any]]:
    """The table as plain data (``cgidm models --families --json``, docs)."""
    rows = []
    for family in FAMILIES:
        rule = family.recognition
        rows.append({
            "name": family.name,
            "title": family.title,
            "adapter": family.adapter,
            "objective": family.objective,
            "conditioning": family.conditioning,
            "space": family.space,
            "pair_classes": list(family.pair_classes),
            "pipeline_classes": list(rule.pipeline_classes),
            "denoiser_classes": list(rule.denoiser_classes),
            "pretrained_layouts": list(family.pretrained_layouts),
            "finetuned_layouts": list(family.finetuned_layouts),
            "lora_formats": list(family.lora_formats),
            "upload_kinds": list(family.upload_kinds),
            "metadata_keys": list(rule.metadata_keys),
            "gpu_dtype": family.defaults.gpu_dtype,
            "resolution": family.defaults.resolution,
            "time_shift": family.defaults.time_shift,
            "guidance": family.defaults.guidance,
            "prompt_source": family.defaults.prompt_source,
            "memory_model": family.memory is not None,
            "memory_borrowed_from": family.memory.borrowed_from if family.memory else "",
            "memory_note": family.memory.note if family.memory else "",
            "memory_pass_bytes": {f"{side}/{'checkpointed' if ckpt else 'plain'}": count
                                  for (side, ckpt), count in family.memory.activation_counts.items()
                                  } if family.memory else {},
            "denoiser_parameters": family.memory.denoiser_parameters if family.memory else 0,
            "summary": family.summary,
        })
    return rows
