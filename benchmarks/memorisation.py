"""How much each cached pixel suite fine-tune learned its members *specifically*.

    .venv/bin/python -m benchmarks.memorisation --datasets vangogh-a --seeds 0 --lora

The suite's strength measure is the members' loss drop (``training.json``): how much the
fine-tune lowered its members' denoising loss. A fine-tune that learns a style lowers its
hold-outs' loss as well (same artist, same palette), and no membership score can tell members
from hold-outs by what both share: what a membership test can find is the *gap*, the members'
relative drop minus the hold-outs'. This prints, per pair whose fine-tune is cached, both drops
(the same 64 (t, noise) draws per image before and after: common random numbers, no Monte Carlo
noise in the differences), the gap, and the AUC of the per-image loss drop (the base's loss
minus the fine-tune's, members vs hold-outs: the cheapest direct membership score there is).
Cached under ``<suite cache>/memorisation``; ``benchmarks.suite`` reads the same values for its
report's strength section.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: The (t, noise) draws: those ``cgidm_core.pixel_lora.finetune`` measures its members' drop with.
LOSS_SAMPLES = 64
LOSS_SEED = 4321


def loss_drops(base: Path, finetune: Path, members: list[Path], holdouts: list[Path]
               ) -> dict[str, Any]:
    """Members' and hold-outs' relative loss drop, their gap, and the per-image drop's AUC."""
    import numpy as np
    import torch

    from cgidm_core import training
    from cgidm_core.images import load_image, to_tensor
    from cgidm_core.stats import evaluate_scores

    unet_base, scheduler = training.load_pipeline_parts(base)
    unet_ft, _ = training.load_pipeline_parts(finetune)
    images = to_tensor([load_image(p) for p in [*members, *holdouts]],
                       unet_base.config.sample_size)
    with torch.no_grad():
        before = training.denoising_losses(unet_base, scheduler, images, samples=LOSS_SAMPLES,
                                           seed=LOSS_SEED).numpy()
        after = training.denoising_losses(unet_ft, scheduler, images, samples=LOSS_SAMPLES,
                                          seed=LOSS_SEED).numpy()
    n = len(members)

    def relative(idx: slice) -> float:
        return float((before[idx].mean() - after[idx].mean()) / before[idx].mean())

    drop = before - after
    report = evaluate_scores(drop[:n], drop[n:], n_bootstrap=1000, seed=0, target_fprs=())
    members_drop, holdout_drop = relative(slice(0, n)), relative(slice(n, None))
    return {"members_drop": members_drop, "holdout_drop": holdout_drop,
            "gap": members_drop - holdout_drop, "drop_auc": report.auc,
            "drop_auc_ci": [report.auc_ci_low, report.auc_ci_high],
            "per_image_drop_sd": float(np.std(drop / before))}


def cached_loss_drops(cache: Path, base: Path, model: Path, members: list[Path],
                      holdouts: list[Path]) -> dict[str, Any]:
    """``loss_drops`` of one fine-tune and hold-out set, cached under ``<cache>/memorisation``
    (keyed by the fine-tune's ``training.json`` and the images)."""
    import hashlib
    import json

    key = hashlib.sha256(json.dumps({
        "training": (model / "training.json").read_text(), "model": str(model),
        "members": [p.name for p in members], "holdouts": [p.name for p in holdouts],
        "samples": LOSS_SAMPLES, "seed": LOSS_SEED, "version": 1}).encode()).hexdigest()[:16]
    out = cache / "memorisation" / f"{key}.json"
    if out.is_file():
        return dict(json.loads(out.read_text()))
    row = loss_drops(base, model, members, holdouts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row))
    return row


def main(argv: list[str] | None = None) -> int:
    from benchmarks import suite
    from cgidm_core.demo import resolve_model_reference

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["vangogh-a", "vangogh-b", "dreambooth"])
    parser.add_argument("--seeds", nargs="+", default=["0", "1"])
    parser.add_argument("--lora", nargs="*", default=None, metavar="RECIPE:SEED",
                        help="pixel LoRA runs as `benchmarks.suite --lora` takes them")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    suite_args = suite.parse_args(["--datasets", *args.datasets, "--seeds", *args.seeds,
                                   "--no-latent", *(["--lora", *args.lora]
                                                    if args.lora is not None else [])])
    base = resolve_model_reference("demo-base")
    print("| pair | members' loss drop | hold-outs' loss drop | gap | per-image drop AUC |")
    print("|---|---|---|---|---|")
    for pair in suite.selected_pairs(suite_args):
        model = pair.model_dir(suite_args.cache)
        if not (model / "unet").is_dir():
            print(f"not trained (skipped): {pair.pair_id}", file=sys.stderr)
            continue
        holdouts = list(pair.split.holdouts[pair.holdout])
        row = cached_loss_drops(suite_args.cache, base, model, list(pair.split.members),
                                holdouts)
        lo, hi = row["drop_auc_ci"]
        print(f"| {pair.pair_id} | {100 * row['members_drop']:.1f} % | "
              f"{100 * row['holdout_drop']:.1f} % | {100 * row['gap']:.1f} points | "
              f"{row['drop_auc']:.2f} [{lo:.2f}, {hi:.2f}] |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
