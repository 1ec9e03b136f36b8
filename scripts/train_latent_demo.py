#!/usr/bin/env python
"""Train the latent, text-conditioned demo base (``demo-latent-base``), a Stable Diffusion
pipeline folder small enough for a CPU, and its packaged LoRA (``demo-latent-vangogh-lora``).

    python scripts/train_latent_demo.py base [--out DIR] [--vae-steps N] [--unet-steps N]
    python scripts/train_latent_demo.py lora [--base DIR] [--out DIR]
    python scripts/train_latent_demo.py grid [--base DIR] [--out PNG]

The base: a VAE is trained first (reconstruction + small KL) on photos and drawn scenes, then
frozen while the text encoder and UNet learn together on captioned photos and scenes (see
:mod:`cgidm_core.latent_training`). The LoRA is one recipe of :mod:`cgidm_core.latent_recipes`
on the ten Van Gogh membership paintings, saved the way diffusers' trainers save it.
Everything is seeded.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_OUT = ROOT / "cgidm_core" / "demo_models"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "wikiart-vangogh"
BASE_DEFAULTS = {"vae_steps": 800, "unet_steps": 2000, "vae_batch": 16, "unet_batch": 32,
                 "vae_lr": 1e-3, "unet_lr": 5e-4, "seed": 0}


def _command_line() -> str:
    return "python scripts/train_latent_demo.py " + shlex.join(sys.argv[1:])


def train_base(out: Path, vae_steps: int, unet_steps: int, vae_batch: int, unet_batch: int,
               vae_lr: float, unet_lr: float, seed: int) -> dict:
    import torch

    from cgidm_core import latent_training as lt
    from cgidm_core import training

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok_dir = out / "tokenizer"
    lt.write_clip_tokenizer(tok_dir, lt.caption_corpus(seed))
    tokenizer = lt.load_tokenizer(tok_dir)
    torch.manual_seed(seed)
    vae = lt.build_vae()
    torch.manual_seed(seed + 1)
    text_encoder = lt.build_text_encoder(tokenizer)
    torch.manual_seed(seed + 2)
    unet = lt.build_unet()
    scheduler = lt.build_scheduler()

    with training.Stopwatch() as vae_clock:
        vae_losses = lt.train_vae(vae, lt.MixedCaptioned(lt.LATENT_IMAGE_SIZE, seed=seed),
                                  training.TrainConfig(vae_steps, vae_batch, vae_lr, seed=seed))
    scaling = lt.latent_scaling_factor(vae, lt.MixedCaptioned(lt.LATENT_IMAGE_SIZE,
                                                              seed=seed + 100))
    vae.register_to_config(scaling_factor=round(scaling, 5))
    print(f"vae done in {vae_clock.seconds:.0f}s, scaling {scaling:.4f}", flush=True)
    with training.Stopwatch() as unet_clock:
        unet_losses = lt.train_text_to_image(
            unet, text_encoder, tokenizer, vae, scheduler,
            lt.MixedCaptioned(lt.LATENT_IMAGE_SIZE, seed=seed + 10),
            training.TrainConfig(unet_steps, unet_batch, unet_lr, seed=seed))
    lt.save_sd_pipeline(out, unet=unet, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, scheduler=scheduler)
    sources = ", ".join(lt.CaptionedPhotos(8, seed=0).sources)
    facts = {
        "vae": {"steps": vae_steps, "batch_size": vae_batch, "learning_rate": vae_lr,
                "first_loss": training.smoothed_final_loss(vae_losses[:100]),
                "final_loss": training.smoothed_final_loss(vae_losses),
                "seconds": vae_clock.seconds, "scaling_factor": round(scaling, 5)},
        "unet_text_encoder": {
            "steps": unet_steps, "batch_size": unet_batch, "learning_rate": unet_lr,
            "first_loss": training.smoothed_final_loss(unet_losses[:100]),
            "final_loss": training.smoothed_final_loss(unet_losses),
            "seconds": unet_clock.seconds},
        "seed": seed, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "data": f"random crops of {sources} (captioned 'a photo of ...'), half of each batch; "
                "procedurally drawn captioned shape scenes, the other half; 10 % empty captions",
        "command": _command_line(),
    }
    (out / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    write_base_card(out, facts)
    return facts


def write_base_card(out: Path, facts: dict) -> None:
    """The model card of demo-latent-base (README.md): data, licence, architecture, training."""
    from cgidm_core import latent_training as lt

    size = sum(p.stat().st_size for p in out.rglob("*.safetensors")) / 1e6
    vae, unet = facts["vae"], facts["unet_text_encoder"]
    sources = facts["data"].split(" (captioned")[0].removeprefix("random crops of ")
    card = f"""# demo-latent-base

The "pretrained" model of cgidm's latent demo family: a Stable Diffusion 1.x-style pipeline
(`StableDiffusionPipeline` folder) small enough to train and check on a CPU. It exists so that
`cgidm check` takes LoRA and DreamBooth fine-tunes through the same code as a real SD model:
loading, prompt encoding, VAE encode/decode, the mask in latent space, LoRA loading.

- **Data** (all offline, no copyright restriction): half of every batch is random crops
  (log-uniform scale, random position and flip) of the 20 public-domain / CC0 photos that ship
  inside scikit-image and matplotlib ({sources}),
  captioned "a photo of ..." (e.g. "a photo of a cat"); the other half is procedurally drawn
  scenes of one or two coloured shapes on a plain background, captioned with what is where
  ("a large red circle at the top left on a blue background"); 10 % of captions are dropped
  (empty prompt) for classifier-free guidance. Nothing from `../shared/data` is used: the Van
  Gogh paintings of the membership test were never seen. The drawn scenes are made by
  `cgidm_core.latent_training.CaptionedScenes` and carry no licence restriction.
- **Images**: {lt.LATENT_IMAGE_SIZE}x{lt.LATENT_IMAGE_SIZE} RGB; latents 4 x
  {lt.LATENT_IMAGE_SIZE // lt.LATENT_FACTOR} x {lt.LATENT_IMAGE_SIZE // lt.LATENT_FACTOR}
  (factor {lt.LATENT_FACTOR}).
- **VAE**: `AutoencoderKL`, 3 blocks (32, 64, 64 channels), 4 latent channels, scaling factor
  {vae['scaling_factor']} (1 / std of the latents); trained first, alone: L1 + MSE
  reconstruction + 1e-6 KL, {vae['steps']} steps, batch {vae['batch_size']}, AdamW lr
  {vae['learning_rate']} (cosine), loss {vae['first_loss']:.4f} -> {vae['final_loss']:.4f}
  (means of 100 steps), {vae['seconds'] / 60:.1f} min.
- **Tokenizer**: a CLIP BPE tokenizer (`vocab.json`, `merges.txt`) whose merges were learnt from
  the captions with the `tokenizers` library (every caption word is one token; any other text
  falls back to byte symbols); {lt.MAX_TOKENS} tokens long.
- **Text encoder**: `CLIPTextModel`, 3 layers, width 64, 4 heads.
- **UNet**: `UNet2DConditionModel`, blocks (64, 128), cross-attention (dim 64) at both levels.
- **Scheduler**: `DDPMScheduler`, SD 1.x's 1000 scaled-linear betas (0.00085-0.012), epsilon.
- **Training (UNet + text encoder together, VAE frozen)**: {unet['steps']} steps, batch
  {unet['batch_size']}, AdamW lr {unet['learning_rate']} (cosine, 100 warm-up steps), gradient
  clipping 1.0, epsilon loss on a posterior sample of the latent; loss {unet['first_loss']:.4f}
  -> {unet['final_loss']:.4f}; {unet['seconds'] / 60:.1f} min; seed {facts['seed']}.
- **Weights**: safetensors, stored in float16 after float32 training ({size:.1f} MB in all;
  cgidm computes in float32); fine-tunes are trained from these stored weights.
- **Machine**: x86_64 CPU, {facts['threads']} torch thread(s), torch {facts['torch']}, 2 cores
  shared with other jobs (1-min load average 6-13 during training); times are wall clock.
- **Sample grid**: docs/images/latent_base_samples.png.
- **Command**: `{facts['command']}`
"""
    (out / "README.md").write_text(card)


def train_shipped_lora(base: Path, members: Path, out: Path) -> dict:
    """The packaged LoRA: the suite's ``lora-attn-r16`` recipe, seed 0, its 1000-step
    checkpoint (see cgidm_core.latent_suite_pairs)."""
    import shutil

    from cgidm_core import latent_finetune as lf
    from cgidm_core import latent_suite_pairs as lsp

    files = sorted(p for p in members.iterdir() if p.suffix.lower() in (".jpg", ".png", ".jpeg"))
    recipe = lsp.RECIPES["lora-attn-r16"][1]
    work = out.parent / (out.name + ".tmp")
    facts = lf.finetune(base, files, recipe, 0, {recipe.steps: work})[recipe.steps]
    card = out / "README.md"
    if card.is_file():  # the packaged model card (with the measured result) is kept
        shutil.copy(card, work / "README.md")
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    facts["command"] = _command_line()
    (out / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def store_half(base: Path) -> None:
    """Rewrite the folder's weights in float16 (halves the shipped size; cgidm loads them as
    float32). Fine-tunes are trained from the float16 weights so they match what ships."""
    import torch
    from safetensors.torch import load_file, save_file

    for file in base.rglob("*.safetensors"):
        tensors = {k: (v.to(torch.float16) if v.is_floating_point() else v)
                   for k, v in load_file(str(file)).items()}
        save_file(tensors, str(file), metadata={"format": "pt"})
        file.chmod(0o644)


def sample_grid(base: Path, out_png: Path, seed: int = 0) -> Path:
    """Images the base draws from a few prompts (4 seeds each), one row per prompt."""
    import torch
    from PIL import Image, ImageDraw

    from cgidm_core import latent_training as lt

    parts = lt.load_parts(base)
    prompts = ["a photo of a cat", "a photo of an astronaut", "a photo of a brick wall",
               "a large red circle at the centre on a blue background",
               "a small yellow square at the top left on a black background",
               "a painting in sks style", ""]
    cols, cell, label_w = 6, 64, 330
    grid = Image.new("RGB", (label_w + cols * cell, len(prompts) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for row, prompt in enumerate(prompts):
        images = lt.generate(parts.unet, parts.text_encoder, parts.tokenizer, parts.vae,
                             parts.scheduler, [prompt] * cols, seed=seed + row, steps=50)
        for col, image in enumerate(images):
            array = ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
            tile = Image.fromarray(array.to(torch.uint8).numpy()).resize(
                (cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (label_w + col * cell, row * cell))
        draw.text((6, row * cell + cell // 2 - 6), prompt or "(empty prompt)", fill="black")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_png)
    return out_png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    sub = parser.add_subparsers(dest="phase", required=True)
    base = sub.add_parser("base")
    base.add_argument("--out", type=Path, default=DEFAULT_OUT / "demo-latent-base")
    base.add_argument("--vae-steps", type=int, default=BASE_DEFAULTS["vae_steps"])
    base.add_argument("--unet-steps", type=int, default=BASE_DEFAULTS["unet_steps"])
    base.add_argument("--vae-batch", type=int, default=BASE_DEFAULTS["vae_batch"])
    base.add_argument("--unet-batch", type=int, default=BASE_DEFAULTS["unet_batch"])
    base.add_argument("--vae-lr", type=float, default=BASE_DEFAULTS["vae_lr"])
    base.add_argument("--unet-lr", type=float, default=BASE_DEFAULTS["unet_lr"])
    base.add_argument("--seed", type=int, default=BASE_DEFAULTS["seed"])
    lora = sub.add_parser("lora", help="train the packaged LoRA demo-latent-vangogh-lora")
    lora.add_argument("--base", type=Path, default=DEFAULT_OUT / "demo-latent-base")
    lora.add_argument("--members", type=Path, default=DEFAULT_DATA / "membership")
    lora.add_argument("--out", type=Path, default=DEFAULT_OUT / "demo-latent-vangogh-lora")
    grid = sub.add_parser("grid", help="draw the base's sample grid")
    grid.add_argument("--base", type=Path, default=DEFAULT_OUT / "demo-latent-base")
    grid.add_argument("--out", type=Path,
                      default=ROOT / "docs" / "images" / "latent_base_samples.png")
    card = sub.add_parser("card", help="rewrite the base's model card from its training.json")
    card.add_argument("--base", type=Path, default=DEFAULT_OUT / "demo-latent-base")
    half = sub.add_parser("half", help="store the base's weights in float16")
    half.add_argument("--base", type=Path, default=DEFAULT_OUT / "demo-latent-base")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.phase == "base":
        facts = train_base(args.out, args.vae_steps, args.unet_steps, args.vae_batch,
                           args.unet_batch, args.vae_lr, args.unet_lr, args.seed)
    elif args.phase == "lora":
        facts = train_shipped_lora(args.base, args.members, args.out)
    elif args.phase == "half":
        store_half(args.base)
        facts = {"float16": str(args.base)}
    elif args.phase == "grid":
        facts = {"grid": str(sample_grid(args.base, args.out))}
    else:
        facts = json.loads((args.base / "training.json").read_text())
        write_base_card(args.base, facts)
    print(json.dumps(facts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
