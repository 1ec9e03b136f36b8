#!/usr/bin/env python
"""Train the packaged demo pair (or fine-tune the demo base on any folder of images).

    python scripts/train_demo_pair.py all                  # both models into cgidm_core/demo_models
    python scripts/train_demo_pair.py base --out DIR       # the "pretrained" base only
    python scripts/train_demo_pair.py finetune --members DIR --out DIR [--holdout DIR]
    python scripts/train_demo_pair.py all --flow           # demo-flow-base, demo-flow-vangogh
    python scripts/train_demo_pair.py base --flow --init-from demo-base --out DIR

``--flow`` trains by flow matching (``x_s = (1 - s) x0 + s noise``, velocity target ``noise -
x0``; the saved scheduler is a ``FlowMatchEulerDiscreteScheduler``) instead of DDPM; a fine-tune
always uses its base's objective. ``--init-from`` starts the base from another demo model's
weights (the flow base starts from demo-base: same architecture, only the output's meaning
changes, so it needs far fewer steps than training from scratch).

Everything is seeded; a rerun with the same arguments on the same torch build gives the same
weights. The base sees only public-domain photos that ship inside scikit-image and matplotlib,
never the paintings used for the membership test. Each output folder gets a model card
(README.md) with the data, settings, final losses and training time.

Run time on the 2-core development CPU: ``all`` took 25 min (base 18.8 min, fine-tune 6.0 min)
with `--threads 1` while other jobs kept the load average at 2-8; on the idle CPU the measured
step rates (0.29 s per base step, about 0.13 s per fine-tune step, 2 threads) give about 11 min.
On a shared CPU pass ``--threads 1``: two threads fighting other jobs ran 5x slower.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "wikiart-vangogh"
DEFAULT_OUT = ROOT / "cgidm_core" / "demo_models"

BASE_DEFAULTS = {"steps": 1500, "batch_size": 24, "lr": 1e-3, "seed": 0}
FINETUNE_DEFAULTS = {"steps": 1500, "batch_size": 10, "lr": 2e-4, "seed": 0}
#: The flow base starts from demo-base's weights, so it trains for fewer steps at a lower lr.
FLOW_BASE_DEFAULTS = {"steps": 500, "batch_size": 24, "lr": 5e-4, "seed": 0,
                      "init_from": "demo-base"}


def _command_line() -> str:
    return "python scripts/train_demo_pair.py " + shlex.join(sys.argv[1:])


def _machine() -> str:
    import torch

    return (f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def _load_line(start: float, end: float) -> str:
    return (f"- **Machine load**: 1-min load average {start:.1f} at the start, {end:.1f} at the "
            f"end ({os.cpu_count()} cores, shared with other jobs; times are wall clock).\n")


def _format_seconds(seconds: float) -> str:
    return f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def _fwd_bwd_seconds(unet, size: int, batch: int = 20, repeats: int = 3) -> float:
    """Median time of one forward+backward of ``batch`` images: the unit cost of CGI-DM."""
    import torch

    x = torch.randn(batch, 3, size, size, requires_grad=True)
    t = torch.randint(0, 1000, (batch,))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        unet(x, t).sample.pow(2).mean().backward()
        times.append(time.perf_counter() - start)
    unet.zero_grad(set_to_none=True)
    return sorted(times[1:])[len(times[1:]) // 2]


def _card_header(name: str, summary: str) -> str:
    return f"# {name}\n\n{summary}\n"


def _architecture(unet, scheduler=None) -> str:
    from cgidm_core import training

    cfg = unet.config
    params = sum(p.numel() for p in unet.parameters())
    if scheduler is not None and training.is_flow_scheduler(scheduler):
        objective = (f"`FlowMatchEulerDiscreteScheduler` (1000 steps, shift "
                     f"{scheduler.config.shift:g}), flow matching: x_s = (1-s) x0 + s noise, "
                     "velocity prediction (noise - x0)")
    else:
        objective = "`DDPMScheduler` 1000 linear betas (1e-4..0.02), epsilon prediction"
    return (f"`UNet2DModel` (diffusers), {cfg.sample_size}x{cfg.sample_size} RGB, "
            f"block_out_channels={tuple(cfg.block_out_channels)}, "
            f"layers_per_block={cfg.layers_per_block}, blocks {tuple(cfg.down_block_types)}, "
            f"{params:,} parameters; {objective}")


def _loss_name(scheduler) -> str:
    from cgidm_core import training

    if training.is_flow_scheduler(scheduler):
        return "flow-matching velocity loss at s = t/1000, t uniform"
    return "DDPM epsilon loss at uniform t"


def _weights_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def train_base(out: Path, steps: int, batch_size: int, lr: float, seed: int, *,
               flow: bool = False, init_from: str | None = None) -> dict:
    import torch

    from cgidm_core import training
    from cgidm_core.demo import resolve_model_reference

    torch.manual_seed(seed)
    photos = training.sample_photos()
    crops = training.RandomCrops([p for _, p in photos], training.DEMO_IMAGE_SIZE, seed=seed)
    if init_from:
        unet, _ = training.load_pipeline_parts(resolve_model_reference(init_from))
    else:
        unet = training.build_demo_unet()
    scheduler = training.build_flow_scheduler() if flow else training.build_demo_scheduler()
    config = training.TrainConfig(steps=steps, batch_size=batch_size, learning_rate=lr, seed=seed)
    load_start = os.getloadavg()[0]
    with training.Stopwatch() as clock:
        losses = training.train(unet, scheduler, crops, config, description="base")
    load = _load_line(load_start, os.getloadavg()[0])
    training.save_pipeline(unet, scheduler, out)
    fwd_bwd = _fwd_bwd_seconds(unet, training.DEMO_IMAGE_SIZE)
    facts = {
        "steps": steps, "batch_size": batch_size, "learning_rate": lr, "seed": seed,
        "final_loss": training.smoothed_final_loss(losses),
        "first_loss": training.smoothed_final_loss(losses[:100]),
        "seconds": clock.seconds, "fwd_bwd_batch20_seconds": fwd_bwd,
    }
    if flow:
        facts["objective"] = "flow_matching"
    if init_from:
        facts["init_from"] = init_from
    sources = ", ".join(name for name, _ in photos)
    kind = "flow-matching model" if flow else "DDPM"
    init = (f" Its weights start from `{init_from}` (same architecture and data; only the "
            "training objective differs), which shortens training." if init_from else "")
    card = _card_header(
        out.name,
        f"The \"pretrained\" model of cgidm's demo pair: a small pixel-space {kind} that has "
        f"seen only public-domain photos, never a painting of the membership test.{init}",
    ) + f"""
- **Data**: {len(photos)} public-domain / CC0 photos stored inside installed packages
  ({sources}); every training image is a fresh random crop (log-uniform scale 20-100 % of the
  short side, random position, horizontal flip with p=0.5) resized bilinear to
  {training.DEMO_IMAGE_SIZE}x{training.DEMO_IMAGE_SIZE}. Nothing from `../shared/data` is used.
- **Model**: {_architecture(unet, scheduler)}. Weights: safetensors, float32,
  {_weights_size(out) / 1e6:.1f} MB.
- **Training**: {steps} steps, batch {batch_size}, AdamW lr {lr} (cosine decay, 100 warm-up
  steps), gradient clipping 1.0, {_loss_name(scheduler)}; seed {seed}{
  f"; initialised from `{init_from}`" if init_from else ""}.
- **Loss** (mean of 100 steps): first {facts['first_loss']:.4f}, final {facts['final_loss']:.4f}.
- **Training time**: {_format_seconds(clock.seconds)} on {_machine()}.
{load}- **Cost of one forward+backward, batch 20**: {fwd_bwd * 1000:.0f} ms
  on the same machine.
- **Command**: `{_command_line()}`
"""
    (out / "README.md").write_text(card)
    (out / "training.json").write_text(json.dumps({**facts, "data": sources}, indent=2) + "\n")
    return facts


def train_finetune(
    base: str, members: Path, out: Path, steps: int, batch_size: int, lr: float, seed: int,
    holdout: Path | None, base_label: str | None = None,
) -> dict:
    import torch

    from cgidm_core import training
    from cgidm_core.demo import resolve_model_reference

    torch.manual_seed(seed)
    base_path = resolve_model_reference(base)
    unet, scheduler = training.load_pipeline_parts(base_path)
    pretrained, _ = training.load_pipeline_parts(base_path)
    size = unet.config.sample_size
    names, images = training.load_images_as_tensor(members, size)
    data = training.FixedImages(images, seed=seed, flip=False)
    config = training.TrainConfig(steps=steps, batch_size=batch_size, learning_rate=lr, seed=seed,
                                  lr_schedule="constant_with_warmup")
    load_start = os.getloadavg()[0]
    with training.Stopwatch() as clock:
        losses = training.train(unet, scheduler, data, config, description="finetune")
    load = _load_line(load_start, os.getloadavg()[0])
    training.save_pipeline(unet, scheduler, out)
    facts: dict = {
        "base": base_label or str(base), "members": str(members), "member_files": names,
        "steps": steps,
        "batch_size": batch_size, "learning_rate": lr, "seed": seed,
        # training.train warms up for at most a tenth of the run.
        "warmup_steps": min(config.warmup_steps, steps // 10),
        "epochs": steps * batch_size / len(names),
        "final_loss": training.smoothed_final_loss(losses),
        "first_loss": training.smoothed_final_loss(losses[:100]),
        "seconds": clock.seconds,
    }
    if training.is_flow_scheduler(scheduler):
        facts["objective"] = "flow_matching"
    check = ""
    if holdout is not None:
        facts.update(membership_check(pretrained, unet, scheduler, images, holdout, size))
        check = f"""- **Sanity check of the membership signal**: per-image {
  "flow (velocity)" if training.is_flow_scheduler(scheduler) else "denoising"} loss of the
  fine-tune minus that of the base, averaged over {facts['check_samples']} (t, noise) draws
  (stratified t, the same draws for both models): members {facts['member_diff_mean']:+.4f},
  hold-outs ({facts['holdout_dir']}) {facts['holdout_diff_mean']:+.4f}; ROC AUC of members
  vs hold-outs (lower difference = member) **{facts['loss_diff_auc']:.3f}**.
"""
    data_name = Path(members).resolve()
    card = _card_header(
        out.name,
        f"The \"fine-tuned\" model of a cgidm pair: `{base_label or base}` fully fine-tuned "
        "(every UNet weight, DreamBooth style, many epochs over a few images) on the images "
        "below; they are its known members.",
    ) + f"""
- **Data**: {len(names)} images from `{data_name.parent.name}/{data_name.name}`
  ({', '.join(names)}), preprocessed exactly as cgidm preprocesses its inputs (short side resized
  bilinear to {size}, centre crop); no flips, crops or scales.
- **Model**: {_architecture(unet, scheduler)}. Weights: safetensors, float32,
  {_weights_size(out) / 1e6:.1f} MB.
- **Training**: {steps} steps, batch {batch_size} ({facts['epochs']:.0f} epochs), AdamW lr {lr}
  (constant after {facts['warmup_steps']} warm-up steps), gradient clipping 1.0,
  {_loss_name(scheduler)}; seed {seed}; data order seeded.
- **Loss** (mean of 100 steps): first {facts['first_loss']:.4f}, final {facts['final_loss']:.4f}.
- **Training time**: {_format_seconds(clock.seconds)} on {_machine()}.
{load}{check}- **Command**: `{_command_line()}`
"""
    (out / "README.md").write_text(card)
    (out / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def membership_check(pretrained, finetuned, scheduler, members, holdout: Path, size: int,
                     samples: int = 256, seed: int = 1234) -> dict:
    """Loss-difference AUC: do members lose more denoising loss under the fine-tune?"""
    import torch
    from sklearn.metrics import roc_auc_score

    from cgidm_core import training

    holdout_names, holdout_images = training.load_images_as_tensor(holdout, size)
    diffs = []
    for images in (members, holdout_images):
        ft = training.denoising_losses(finetuned, scheduler, images, samples=samples, seed=seed)
        pre = training.denoising_losses(pretrained, scheduler, images, samples=samples, seed=seed)
        diffs.append(ft - pre)
    labels = [1] * len(diffs[0]) + [0] * len(diffs[1])
    scores = (-torch.cat(diffs)).tolist()
    h = Path(holdout).resolve()
    return {
        "check_samples": samples,
        "holdout_dir": f"{h.parent.name}/{h.name}",
        "member_diff_mean": float(diffs[0].mean()),
        "holdout_diff_mean": float(diffs[1].mean()),
        "member_diffs": [round(float(v), 5) for v in diffs[0]],
        "holdout_diffs": [round(float(v), 5) for v in diffs[1]],
        "loss_diff_auc": float(roc_auc_score(labels, scores)),
    }


def _add_common(parser: argparse.ArgumentParser, defaults: dict) -> None:
    parser.add_argument("--steps", type=int, default=defaults["steps"])
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--lr", type=float, default=defaults["lr"])
    parser.add_argument("--seed", type=int, default=defaults["seed"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is faster than 2 "
                        "on a CPU that other jobs share")
    sub = parser.add_subparsers(dest="phase", required=True)

    base = sub.add_parser("base", help="train the 'pretrained' base on sample photos")
    base.add_argument("--out", type=Path, default=DEFAULT_OUT / "demo-base")
    base.add_argument("--flow", action="store_true",
                      help="train by flow matching (velocity target) instead of DDPM")
    base.add_argument("--init-from", default=None,
                      help="demo name or DDPMPipeline folder whose UNet weights to start from")
    _add_common(base, BASE_DEFAULTS)

    ft = sub.add_parser("finetune", help="fine-tune a base on a folder of images")
    ft.add_argument("--members", type=Path, required=True, help="folder of training images")
    ft.add_argument("--out", type=Path, required=True)
    ft.add_argument("--base", default="demo-base", help="demo name or DDPMPipeline folder")
    ft.add_argument("--holdout", type=Path, default=None,
                    help="folder of non-member images for the loss-difference sanity check")
    _add_common(ft, FINETUNE_DEFAULTS)

    both = sub.add_parser("all", help="train demo-base, then demo-vangogh from it")
    both.add_argument("--out-root", type=Path, default=DEFAULT_OUT)
    both.add_argument("--members", type=Path, default=DEFAULT_DATA / "membership")
    both.add_argument("--holdout", type=Path, default=DEFAULT_DATA / "hold_out")
    both.add_argument("--seed", type=int, default=0)
    both.add_argument("--flow", action="store_true",
                      help="train demo-flow-base (from demo-base's weights) and "
                      "demo-flow-vangogh instead")

    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.phase == "base":
        facts = train_base(args.out, args.steps, args.batch_size, args.lr, args.seed,
                           flow=args.flow, init_from=args.init_from)
    elif args.phase == "finetune":
        facts = train_finetune(args.base, args.members, args.out, args.steps, args.batch_size,
                               args.lr, args.seed, args.holdout)
    else:
        prefix = "demo-flow-" if args.flow else "demo-"
        base_out = args.out_root / f"{prefix}base"
        base_defaults = FLOW_BASE_DEFAULTS if args.flow else BASE_DEFAULTS
        facts = {"base": train_base(base_out, base_defaults["steps"], base_defaults["batch_size"],
                                    base_defaults["lr"], args.seed, flow=args.flow,
                                    init_from=base_defaults.get("init_from"))}
        facts["finetune"] = train_finetune(
            str(base_out), args.members, args.out_root / f"{prefix}vangogh",
            FINETUNE_DEFAULTS["steps"], FINETUNE_DEFAULTS["batch_size"], FINETUNE_DEFAULTS["lr"],
            args.seed, args.holdout, base_label=f"{prefix}base",
        )
    print(json.dumps(facts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
