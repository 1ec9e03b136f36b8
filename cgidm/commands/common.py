"""Arguments and helpers shared by the commands that run the method (check, eval)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cgidm_core.names import (
    ALL_METRICS,
    DEFAULT_METRIC,
    DTYPES,
    FINETUNED_KINDS,
    GRADIENT_CHECKPOINTING_MODES,
    IMAGE_SUFFIXES,
    PRESETS,
)


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``required=False`` lets a command fill the models in another way (``eval --suite-pair``)."""
    group = parser.add_argument_group("models")
    group.add_argument("--pretrained", help="base model folder or demo name (default, for a "
                       "suspect named by a hub reference: the registered base its hub page "
                       "records, through CGIDM_MODELS' base-model table)")
    group.add_argument(
        "--finetuned",
        required=required,
        help="suspect model: pipeline folder, DreamBooth unet/ (Flux: transformer/) folder, "
        "LoRA file/folder, single-file .safetensors, bare UNet weights .safetensors (with the "
        "base for its config), demo name, or a hub reference fetched into the cache: "
        "hf:OWNER/NAME[@REVISION][:FILE], civitai:VERSION_ID, a huggingface.co or civitai.com "
        "model page URL, urn:air:...:civitai:MODEL@VERSION",
    )
    group.add_argument(
        "--pretrained-config",
        help="Flux.1 pipeline folder completing a --pretrained Flux transformer given as one "
        ".safetensors file (its config, VAE, text encoders, scheduler)",
    )
    group.add_argument(
        "--finetuned-kind",
        choices=FINETUNED_KINDS,
        help="format of --finetuned (detected when omitted)",
    )
    group.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument("--dtype", choices=DTYPES)
    group.add_argument(
        "--allow-network", action="store_true", help="allow fetching models from a hub"
    )


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method")
    group.add_argument("--prompt", help="instance prompt of the fine-tune (e.g. 'sks style')")
    group.add_argument(
        "--preset",
        choices=PRESETS,
        default="default",
        help="'reference' follows the authors' path (1000 steps, step 2, independent noise, "
        "sampled VAE latent, partial image rounded to 8 bits and re-encoded); seeded, unlike "
        "theirs",
    )
    group.add_argument("--steps", type=int, help="PGD steps (overrides the preset)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument(
        "--batch-size", type=int, help="images per PGD batch (default: 32 pixel, 8 SD)"
    )
    group.add_argument("--mc-samples", type=int, help="Monte Carlo samples per PGD step")
    group.add_argument(
        "--resolution",
        type=int,
        help="pixel side to run at (default: the model's native size: 512 SD 1.x, 768 SD 2.x-768, "
        "1024 SDXL and Flux.1); smaller is a cheaper check, a multiple of 32 for SD/SDXL, of 16 "
        "for Flux.1",
    )
    group.add_argument(
        "--gradient-checkpointing", choices=GRADIENT_CHECKPOINTING_MODES,
        help="recompute the denoisers' activations in the backward pass: less GPU memory, about "
        "a third more compute, the same scores. auto (default): on only where one image would "
        "not fit the GPU without it (e.g. an SDXL full pair at 1024 px on a 24 GB card)",
    )
    group.add_argument("--metric", help=f"score metric: {', '.join(ALL_METRICS)} (default "
                       f"{DEFAULT_METRIC})")
    group.add_argument(
        "--palette-bounds", action="store_true",
        help="keep each channel of the recovered cells inside the range it takes in the kept "
        "half of the same image: pictures that look like the image instead of saturated "
        "colours. Measured on one strong suite pair only (SSIM AUC stayed 1.00, PSNR fell to "
        "0.88), so it is off by default (docs/ACCURACY.md, Pictures)",
    )
    group.add_argument("--feature-model", help="local folder of a CLIP/DINO model for clip/dino")


def inversion_config(args: argparse.Namespace) -> Any:
    """The ``--preset`` with the flags given on top (``preset_config``, as the worker builds a
    job's settings)."""
    from cgidm_core.inversion_config import preset_config

    overrides: dict[str, Any] = {"seed": args.seed}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.mc_samples is not None:
        overrides["mc_samples"] = args.mc_samples
    if getattr(args, "resolution", None) is not None:
        overrides["resolution"] = args.resolution
    if getattr(args, "gradient_checkpointing", None):
        overrides["gradient_checkpointing"] = args.gradient_checkpointing
    if getattr(args, "palette_bounds", False):
        overrides["palette_bounds"] = True
    return preset_config(args.preset, overrides)


def cli_cache_dir() -> Path:
    """The command line's model cache: CGIDM_MODEL_CACHE_DIR, else ~/.cache/cgidm."""
    import os

    configured = os.environ.get("CGIDM_MODEL_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "cgidm"


def resolve_suspect(args: argparse.Namespace) -> dict[str, Any] | None:
    """Fetch ``--finetuned`` when it is a hub reference, and fill in what its hub page records.

    The file is fetched (or found in the cache) and checked like an upload (safetensors, a
    consistent header); ``--finetuned`` then names the local file. Without ``--pretrained``, the
    base is the registered one the page names (Civitai's ``baseModel``, the model card's
    ``base_model``; ``cgidm.registry.BASE_MODEL_NAMES`` and the registry file's
    ``base_models``); without ``--prompt``, Civitai's trained words are the prompt. Returns the
    provenance record of the fetch (None for a local model)."""
    from cgidm.model_refs import looks_like_reference

    if not (args.finetuned and looks_like_reference(args.finetuned)):
        if not args.pretrained:
            from cgidm_core.errors import ConfigError

            raise ConfigError("--pretrained is required (it may be left out only when "
                              "--finetuned is a hub reference whose base is registered)")
        args.suspect_civitai = _civitai_lookup(args.finetuned)
        return None
    from cgidm.model_fetch import FetchConfig, fetch
    from cgidm.model_files import read_header
    from cgidm.model_refs import parse_reference
    from cgidm.settings import Settings

    settings = Settings()
    ref = parse_reference(args.finetuned)
    config = FetchConfig(cache_dir=cli_cache_dir(), civitai_url=settings.civitai_url,
                         civitai_token=settings.civitai_token,
                         max_bytes=settings.max_model_bytes, offline=user_hub_offline())
    print(f"fetching {ref.canonical} ...", flush=True)
    fetched = fetch(ref, config)
    if fetched.sha256 is not None:
        read_header(str(fetched.path))  # a hostile or broken file is refused before loading
    print(f"suspect: {fetched.canonical} ({fetched.filename or 'pipeline folder'}, "
          f"{fetched.size} bytes{', from the cache' if fetched.from_cache else ''})")
    record = fetched.record()
    if not args.pretrained:
        from cgidm.registry import load_registry

        base = load_registry(settings.models).base_for(fetched.base_model)
        args.pretrained = base.path
        record["pretrained_from"] = {"base_model": fetched.base_model, "registry_id": base.id}
        print(f"base: {base.id} (the suspect's base model is {fetched.base_model!r})")
    if getattr(args, "prompt", None) is None and fetched.trained_words:
        args.prompt = ", ".join(fetched.trained_words)
        record["prompt_from"] = "trained_words"
        print(f"prompt: {args.prompt!r} (the version's trained words on Civitai)")
    args.finetuned_reference, args.finetuned = args.finetuned, str(fetched.path)
    args.suspect_source = record
    return record


def _civitai_lookup(finetuned: str | None) -> dict[str, Any] | None:
    """Which Civitai version a local suspect file is, by its sha256, when
    CGIDM_CIVITAI_HASH_LOOKUP is set (it sends the file's hash to Civitai, nothing else)."""
    from cgidm.settings import Settings

    settings = Settings()
    path = Path(finetuned or "")
    if not settings.civitai_hash_lookup or not path.is_file():
        return None
    from cgidm.model_fetch import FetchConfig, ModelFetchError, civitai_by_hash, sha256_file

    config = FetchConfig(cache_dir=cli_cache_dir(), civitai_url=settings.civitai_url,
                         civitai_token=settings.civitai_token)
    try:
        found = civitai_by_hash(config, sha256_file(path))
    except ModelFetchError as exc:
        print(f"note: Civitai lookup by hash failed: {exc}")
        return {"looked_up": True, "error": exc.code}
    if found is not None:
        print(f"suspect file is Civitai version {found['version_id']} "
              f"(base model {found.get('base_model')!r})")
    return {"looked_up": True, "found": found is not None, **(found or {})}


def user_hub_offline() -> bool | None:
    """HF_HUB_OFFLINE as the user set it before ``cgidm`` defaulted it to 1 for model loads."""
    from cgidm import cli

    value = cli.USER_HF_HUB_OFFLINE
    if value is None:
        return False  # a hub reference is the request to fetch
    return value.strip().lower() in ("1", "true", "yes", "on")


def load_pair_from_args(args: argparse.Namespace) -> Any:
    from cgidm_core.api import load_pair

    resolve_suspect(args)
    return load_pair(
        args.pretrained,
        args.finetuned,
        finetuned_kind=args.finetuned_kind,
        device=args.device,
        dtype=args.dtype,
        allow_network=args.allow_network,
        pretrained_config=getattr(args, "pretrained_config", None),
    )


def expand_images(paths: list[str], error: type[Exception] | None = None) -> list[Path]:
    """Files as given; folders expand to the images inside them, sorted by name.

    ``error`` is the exception to raise for a missing path or an empty folder: the library's
    ``ImageInputError`` by default, the client's own for ``cgidm submit``, which must run where
    torch (and so ``cgidm_core``) is not installed.
    """
    if error is None:
        from cgidm_core.errors import ImageInputError

        error = ImageInputError

    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise error(f"{path}: no images (.png, .jpg, ...) in this folder")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise error(f"{path}: no such file or folder")
    return out


@contextmanager
def progress_bar(desc: str) -> Iterator[Any]:
    """A tqdm bar driven by the library's ``progress(done, total)`` callback.

    The bar appears at the first step, so an error raised before any work (a bad image, a bad
    setting) prints one clear line and no empty bar.
    """
    from tqdm import tqdm

    bars: list[Any] = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc=desc, unit="step", total=total, dynamic_ncols=True))
        bar = bars[0]
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()
