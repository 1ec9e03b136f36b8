"""How much a fine-tune learned its members *specifically*: the members' relative loss drop
minus the hold-outs'.

A fine-tune that learns a style lowers its hold-outs' loss as well (same artist, same palette),
and no membership score can tell members from hold-outs by what both share: what a membership
test can find is the *gap*, the members' relative drop minus the hold-outs'. Both drops use the
same (t, noise) draws for every image and both models (common random numbers), so the
differences carry no Monte Carlo noise of the draws. Per image, the drop is what the
``contrast`` score measures (with more draws); the gap is its population version, known only
with the labels: a strength axis for the benchmark suite, never a verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The (t, noise) draws: those ``cgidm_core.pixel_lora.finetune`` measures its members' drop with.
LOSS_SAMPLES = 64
LOSS_SEED = 4321


def summarise(before: Any, after: Any, n_members: int) -> dict[str, Any]:
    """Per-image losses before and after (members first) -> both sets' relative drop, the gap,
    and the AUC of the per-image drop (the base's loss minus the fine-tune's)."""
    import numpy as np

    from .stats import evaluate_scores

    def relative(idx: slice) -> float:
        return float((before[idx].mean() - after[idx].mean()) / before[idx].mean())

    drop = before - after
    report = evaluate_scores(drop[:n_members], drop[n_members:], n_bootstrap=1000, seed=0,
                             target_fprs=())
    members_drop = relative(slice(0, n_members))
    holdout_drop = relative(slice(n_members, None))
    return {"members_drop": members_drop, "holdout_drop": holdout_drop,
            "gap": members_drop - holdout_drop, "drop_auc": report.auc,
            "drop_auc_ci": [report.auc_ci_low, report.auc_ci_high],
            "per_image_drop_sd": float(np.std(drop / before))}


def loss_drops(base: Path, finetune: Path, members: list[Path], holdouts: list[Path]
               ) -> dict[str, Any]:
    """Members' and hold-outs' relative loss drop, their gap, and the per-image drop's AUC."""
    import torch

    from . import training
    from .images import load_image, to_tensor

    unet_base, scheduler = training.load_pipeline_parts(base)
    unet_ft, _ = training.load_pipeline_parts(finetune)
    images = to_tensor([load_image(p) for p in [*members, *holdouts]],
                       unet_base.config.sample_size)
    with torch.no_grad():
        before = training.denoising_losses(unet_base, scheduler, images, samples=LOSS_SAMPLES,
                                           seed=LOSS_SEED).numpy()
        after = training.denoising_losses(unet_ft, scheduler, images, samples=LOSS_SAMPLES,
                                          seed=LOSS_SEED).numpy()
    return summarise(before, after, len(members))


def pair_loss_drops(pair: Any, members: list[Path], holdouts: list[Path],
                    samples: int = LOSS_SAMPLES, seed: int = LOSS_SEED) -> dict[str, Any]:
    """``loss_drops`` through the model-pair API, for any family (a latent pair: in its latent
    space, conditioned on its prompt; a flow pair: its velocity error): the base's and the
    fine-tune's denoising errors with the same stratified timesteps and noise draws for every
    image and both models (common random numbers), so a per-image drop is the same quantity as
    the ``contrast`` score with ``samples`` draws."""
    import numpy as np
    import torch

    from .images import load_image, to_tensor

    cond = pair.conditioning(pair.default_prompt)
    big_t = pair.num_train_timesteps
    gen = torch.Generator().manual_seed(seed)
    t_all = ((torch.arange(samples) + torch.rand(samples, generator=gen)) * big_t / samples)
    t_all = t_all.long().clamp(0, big_t - 1)
    before, after = [], []
    with torch.no_grad():
        for path in [*members, *holdouts]:
            z0 = pair.encode(to_tensor([load_image(path)], pair.image_size).to(pair.device))
            z0 = z0.float()
            noise = torch.randn((samples, *z0.shape[1:]), generator=torch.Generator()
                                .manual_seed(seed + 1)).to(pair.device)
            z = z0.repeat(samples, *([1] * (z0.dim() - 1)))
            t = t_all.to(pair.device)
            z_t = pair.add_noise(z, noise, t)
            target = pair.loss_target(z, noise, t)
            errors = []
            for eps in (pair.eps_pretrained, pair.eps_finetuned):
                errors.append(float((eps(z_t, t, cond).float() - target).pow(2).mean()))
            before.append(errors[0])
            after.append(errors[1])
    return summarise(np.asarray(before), np.asarray(after), len(members))


def cached_loss_drops(cache: Path, base: Path, model: Path, members: list[Path],
                      holdouts: list[Path]) -> dict[str, Any]:
    """``loss_drops`` of one fine-tune and hold-out set, cached under ``<cache>/memorisation``
    (keyed by the fine-tune's ``training.json``, or its UNet weights' digest where it has none,
    and the images)."""
    import hashlib
    import json

    facts = model / "training.json"
    identity = (facts.read_text() if facts.is_file() else hashlib.sha256(
        (model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest())
    key = hashlib.sha256(json.dumps({
        "training": identity, "model": str(model),
        "members": [p.name for p in members], "holdouts": [p.name for p in holdouts],
        "samples": LOSS_SAMPLES, "seed": LOSS_SEED, "version": 1}).encode()).hexdigest()[:16]
    out = cache / "memorisation" / f"{key}.json"
    if out.is_file():
        return dict(json.loads(out.read_text()))
    row = loss_drops(base, model, members, holdouts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row))
    return row


__all__ = ["LOSS_SAMPLES", "LOSS_SEED", "cached_loss_drops", "loss_drops", "pair_loss_drops",
           "summarise"]
