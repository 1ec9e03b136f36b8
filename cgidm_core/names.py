"""The vocabulary the library shares with the CLI and the gateway, without importing torch.

The gateway image has no torch, and ``cgidm --help`` must stay instant, yet both need the names
the method knows: its membership methods, similarity metrics, fine-tune storage kinds, model
families and the packaged demo models. They are defined here, once, in a module that imports
nothing but the standard library, so that ``cgidm/`` and ``app/`` import them instead of keeping
copies. The error classes live in the equally torch-free :mod:`cgidm_core.errors`.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------------
# membership methods (``cgidm eval --method``, ``cgidm_core.evaluation.score_images``)

#: Every method ``score_images`` knows. "cgidm" is the paper's method (inversion + similarity);
#: "combined" and "fused" add the z-scored similarity to the z-scored contrast or loss-attack
#: score.
METHODS: tuple[str, ...] = ("cgidm", "loss", "pia", "pian", "secmi", "contrast", "contrast64",
                            "combined", "fused", "evidence")
#: The methods that run the inversion (and so take the inversion settings and a metric).
INVERSION_METHODS: tuple[str, ...] = ("cgidm", "combined", "fused", "evidence")

#: One line per method, for help texts and tables.
METHOD_DESCRIPTIONS: dict[str, str] = {
    "cgidm": "contrasting gradient inversion + similarity of the recovery (the paper)",
    "loss": "fine-tuned model's denoising error at t in {50, 100, 200}",
    "pia": "Proximal Initialization Attack, t=200, l4 (Kong et al. 2024)",
    "pian": "PIA with eps0 normalised to Gaussian scale (the authors' PIAN), t=200, l4",
    "secmi": "SecMI_stat, t_sec=100, interval 10 (Duan et al. 2023)",
    "contrast": "CGI-DM's objective at the original image, no inversion",
    "contrast64": "the contrast with 64 (t, noise) draws shared by every image, no inversion",
    "combined": "z-scored cgidm similarity + z-scored contrast score",
    "fused": "z-scored cgidm similarity + z-scored loss attack",
    "evidence": "the verdict's score of cgidm check and the service (cgidm_core.evidence): "
                "z(contrast64) + z(progress of the inversion towards the original), over the "
                "images scored",
}

#: The benchmark suite's name for the verdict's score (``EVIDENCE_COMPONENTS["paired"]`` in
#: :mod:`cgidm_core.evidence`): suite reports read its per-pair numbers under it.
VERDICT_CANDIDATE = "fuse:contrast64+progress"
#: The suite's name for the verdict's score from the null controls to 2026-12-08
#: (``EVIDENCE_COMPONENTS["objective+contrast"]``).
PREVIOUS_VERDICT_CANDIDATE = "fuse:objective+contrast"
#: The suite's name for the verdict's score before the null controls of issue #22
#: (``EVIDENCE_COMPONENTS["fused"]``); the power table was measured on it.
FORMER_VERDICT_CANDIDATE = "fuse:ssim+psnr+loss+contrast"

# ------------------------------------------------------------------------------------------
# verdicts (``cgidm_core.stats``, ``cgidm_core.evidence``; shown by ``app/web/evidence.py``)

#: p <= alpha against the controls: the image (or the set) was likely in the fine-tuning set.
MEMBER_EVIDENCE = "member_evidence"
#: p > alpha with enough controls to reach alpha at all.
NO_EVIDENCE = "no_evidence"
#: The controls given cannot reach the significance level at all (fewer than ``1/alpha - 1`` of
#: them): saying "no evidence" would blame the image for a missing control.
INCONCLUSIVE = "inconclusive"
VERDICTS: tuple[str, ...] = (MEMBER_EVIDENCE, NO_EVIDENCE, INCONCLUSIVE)

# ------------------------------------------------------------------------------------------
# the choices a check offers (the CLI's ``choices``, the API schema's ``Literal``s, the library's
# checks all read these)

#: ``cgidm_core.inversion_config.preset_config`` / ``--preset`` / the API's ``preset``:
#: ``reference`` is the authors' path (``InversionConfig.reference``).
PRESETS: tuple[str, ...] = ("default", "reference")
#: ``InversionConfig.gradient_checkpointing`` / ``--gradient-checkpointing``.
GRADIENT_CHECKPOINTING_MODES: tuple[str, ...] = ("auto", "on", "off")
#: ``--dtype`` / ``CGIDM_DTYPE``: the precision the pair runs in (``models.devices`` maps them).
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
#: ``authenticate(display=...)`` / ``cgidm check --display``: the recovered picture a person
#: looks at (scores always use the raw recovery).
DISPLAY_MODES: tuple[str, ...] = ("palette_clamp", "raw")
DEFAULT_DISPLAY = "palette_clamp"
#: ``cgidm check --evidence``: the score verdicts rest on; ``cgidm_core.evidence`` also accepts
#: its internal ``given``.
CHECK_EVIDENCE_MODES: tuple[str, ...] = ("paired", "objective+contrast", "fused", "contrast",
                                         "similarity")
#: The verdicts' score by default (``cgidm_core.evidence.EVIDENCE_COMPONENTS["paired"]``): the
#: shared-draw contrast and how far the inversion moved towards the original, the suite's choice
#: among the scores that pass the null controls, by its rule over both families
#: (docs/ACCURACY.md).
DEFAULT_EVIDENCE = "paired"

# ------------------------------------------------------------------------------------------
# stored pictures of a result (``ImageResult.recovered``, ``.partial``, ``.side_by_side()``)

#: The pictures the worker stores per image, and the service's artifact URLs name
#: (``/jobs/{id}/artifacts/{name}/{kind}.png``).
ARTIFACT_KINDS: tuple[str, ...] = ("recovered", "partial", "side_by_side")
#: The base model's own recovery (cgidm_core.base_recovery): stored when the check computed it.
BASE_RECOVERED = "base_recovered"
#: Every kind of picture a check may store for an image.
STORED_KINDS: tuple[str, ...] = (*ARTIFACT_KINDS, BASE_RECOVERED)

# ------------------------------------------------------------------------------------------
# image files

#: The file suffixes read from a folder of images, everywhere a folder is accepted (the CLI,
#: ``cgidm eval``, the benchmark suite's splits, demo-pair training). Case-insensitive.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif",
                                   ".tiff")

# ------------------------------------------------------------------------------------------
# similarity metrics (``cgidm_core.similarity``)

PIXEL_METRICS: tuple[str, ...] = ("ssim", "psnr", "mse")
#: Feature metrics embed whole images with a local CLIP or DINO model folder.
FEATURE_METRICS: tuple[str, ...] = ("clip", "dino")
ALL_METRICS: tuple[str, ...] = PIXEL_METRICS + FEATURE_METRICS

#: Checked on the benchmark suite (``benchmarks/suite.py``, docs/ACCURACY.md), worst case first:
#: SSIM 0.58 worst / 0.82 mean AUC over 24 pairs, PSNR 0.55 / 0.90. PSNR's higher mean does not
#: outweigh its lower worst case under that rule, so SSIM stays; both are beaten by the contrast
#: score and by the fusion with the loss attack (``evaluation.FUSIONS``, README "Defaults").
DEFAULT_METRIC = "ssim"

# ------------------------------------------------------------------------------------------
# model families and how a fine-tune is stored (``cgidm_core.models``)

#: ``ModelPair.family`` of each supported family: the registry names. Everything else about a
#: family (recognition, layouts, defaults, memory, its adapter) is its entry in
#: :mod:`cgidm_core.families`, the one table the code reads.
SD_FAMILY = "stable-diffusion"
SDXL_FAMILY = "stable-diffusion-xl"
DDPM_FAMILY = "ddpm"
#: Pixel-space UNets trained by flow matching (the flow demo pair).
PIXEL_FLOW_FAMILY = "pixel-flow"
#: The pixel-space families (identity codec, no text).
PIXEL_FAMILIES: tuple[str, ...] = (DDPM_FAMILY, PIXEL_FLOW_FAMILY)
FLUX_FAMILY = "flux"
#: Stable Diffusion 3 / 3.5 (adapter: ``cgidm_core.models.sd3``).
SD3_FAMILY = "sd3"
#: Chroma (adapter: ``cgidm_core.models.chroma``).
CHROMA_FAMILY = "chroma"
#: Z-Image (adapter: ``cgidm_core.models.zimage``).
ZIMAGE_FAMILY = "z-image"
#: Qwen-Image (adapter: ``cgidm_core.models.qwen_image``).
QWEN_IMAGE_FAMILY = "qwen-image"
#: Flux.2 Klein (adapter: ``cgidm_core.models.flux2``).
FLUX2_FAMILY = "flux2"
#: Flux.2 dev (adapter: ``cgidm_core.models.flux2_dev``).
FLUX2_DEV_FAMILY = "flux2-dev"
#: HiDream-I1 (recognised to be refused by name: ``cgidm_core.families.REFUSED``).
HIDREAM_FAMILY = "hidream"

#: Suffixes of pickled PyTorch checkpoints: never loaded (unpickling runs code); the upload
#: check, the hub fetch and the format detection all refuse them by these names.
PICKLE_SUFFIXES: tuple[str, ...] = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")

#: What ``cgidm_core.models.formats.detect_finetuned_kind`` can answer (``--finetuned-kind``);
#: ``unet`` is a bare UNet weights file built with the base's UNet config.
FINETUNED_KINDS: tuple[str, ...] = ("pipeline", "dreambooth", "lora", "single_file", "ddpm",
                                    "unet")

# ------------------------------------------------------------------------------------------
# the packaged demo models (``cgidm_core.demo`` resolves them to folders)

#: Demo name -> one-line description.
DEMO_MODELS: dict[str, str] = {
    "demo-base": (
        "32x32 pixel-space DDPM trained on public-domain sample photos from scikit-image and "
        "matplotlib (the 'pretrained' model)"
    ),
    "demo-vangogh": (
        "demo-base fully fine-tuned on 10 Van Gogh paintings "
        "(wikiart-vangogh/membership; the 'fine-tuned' model)"
    ),
    "demo-vangogh-light": (
        "demo-base lightly fine-tuned on the same 10 Van Gogh paintings (200 steps instead of "
        "1500): a harder case, on which the membership methods differ"
    ),
    "demo-flow-base": (
        "32x32 pixel-space flow-matching UNet (velocity prediction) trained on the same "
        "public-domain sample photos, starting from demo-base's weights (the 'pretrained' model)"
    ),
    "demo-flow-vangogh": (
        "demo-flow-base fully fine-tuned by flow matching on the 10 Van Gogh paintings "
        "(wikiart-vangogh/membership; the 'fine-tuned' model)"
    ),
    "demo-latent-base": (
        "32x32 latent, text-conditioned Stable Diffusion pipeline (AutoencoderKL with a factor-4 "
        "latent, CLIP text encoder with its own tokenizer, cross-attention UNet) trained on "
        "captioned public-domain photos and drawn shape scenes (the 'pretrained' model)"
    ),
    "demo-latent-vangogh-lora": (
        "a rank-16 LoRA (UNet attention, diffusers' LoRA format) of demo-latent-base on the 10 "
        "Van Gogh paintings with the trigger 'a painting in sks style' (the 'fine-tuned' model)"
    ),
}

#: Demo name -> the demo it was fine-tuned from (None for a base model).
DEMO_BASES: dict[str, str | None] = {
    "demo-base": None,
    "demo-vangogh": "demo-base",
    "demo-vangogh-light": "demo-base",
    "demo-flow-base": None,
    "demo-flow-vangogh": "demo-flow-base",
    "demo-latent-base": None,
    "demo-latent-vangogh-lora": "demo-latent-base",
}

#: Family of each demo model.
DEMO_FAMILIES: dict[str, str] = {
    name: PIXEL_FLOW_FAMILY if name.startswith("demo-flow-")
    else SD_FAMILY if name.startswith("demo-latent-") else DDPM_FAMILY
    for name in DEMO_MODELS
}
