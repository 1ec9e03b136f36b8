"""Arguments and helpers shared by the commands that run the method (check, eval)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cgidm_core.names import FINETUNED_KINDS, IMAGE_SUFFIXES


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``required=False`` lets a command fill the models in another way (``eval --suite-pair``)."""
    group = parser.add_argument_group("models")
    group.add_argument("--pretrained", required=required, help="base model folder or demo name")
    group.add_argument(
        "--finetuned",
        required=required,
        help="suspect model: pipeline folder, DreamBooth unet/ (Flux: transformer/) folder, "
        "LoRA file/folder, single-file .safetensors, bare UNet weights .safetensors (with the "
        "base for its config), or demo name",
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
    group.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    group.add_argument(
        "--allow-network", action="store_true", help="allow fetching models from a hub"
    )


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method")
    group.add_argument("--prompt", help="instance prompt of the fine-tune (e.g. 'sks style')")
    group.add_argument(
        "--preset",
        choices=["default", "reference"],
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
        "--gradient-checkpointing", choices=["auto", "on", "off"],
        help="recompute the denoisers' activations in the backward pass: less GPU memory, about "
        "a third more compute, the same scores. auto (default): on only where one image would "
        "not fit the GPU without it (e.g. an SDXL full pair at 1024 px on a 24 GB card)",
    )
    group.add_argument("--metric", help="score metric: ssim (default), psnr, mse, clip, dino")
    group.add_argument(
        "--palette-bounds", action="store_true",
        help="keep each channel of the recovered cells inside the range it takes in the kept "
        "half of the same image: pictures that look like the image instead of saturated "
        "colours. Measured on one strong suite pair only (SSIM AUC stayed 1.00, PSNR fell to "
        "0.88), so it is off by default (docs/ACCURACY.md, Pictures)",
    )
    group.add_argument("--feature-model", help="local folder of a CLIP/DINO model for clip/dino")


def inversion_config(args: argparse.Namespace) -> Any:
    from cgidm_core.inversion import InversionConfig

    config = InversionConfig.reference() if args.preset == "reference" else InversionConfig()
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
    from dataclasses import replace

    return replace(config, **overrides)


def load_pair_from_args(args: argparse.Namespace) -> Any:
    from cgidm_core.api import load_pair

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
        from cgidm_core.errors import ImageInputError as error

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
