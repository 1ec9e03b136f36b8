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
The measure lives in ``cgidm_core.memorisation``; cached under ``<suite cache>/memorisation``,
where ``benchmarks.suite`` reads the same values for its report's strength section.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _row(pair_id: str, row: dict) -> str:
    lo, hi = row["drop_auc_ci"]
    return (f"| {pair_id} | {100 * row['members_drop']:.1f} % | {100 * row['holdout_drop']:.1f} % "
            f"| {100 * row['gap']:.1f} points | {row['drop_auc']:.2f} [{lo:.2f}, {hi:.2f}] |")


def latent_rows(cache: Path) -> None:
    """The latent suite's pairs (``cgidm_core.latent_suite_pairs``) whose fine-tune is cached,
    measured through the pair API (``pair_loss_drops``: their latent space, their prompt)."""
    from cgidm_core.api import load_pair
    from cgidm_core.latent_suite_pairs import latent_suite_pairs
    from cgidm_core.memorisation import pair_loss_drops

    for pair in latent_suite_pairs():
        model = pair.model_dir(cache)
        if not model.exists():
            print(f"not trained (skipped): {pair.pair_id}", file=sys.stderr)
            continue
        loaded = load_pair(pair.base, str(model), device="cpu")
        print(_row(pair.pair_id, pair_loss_drops(loaded, list(pair.members),
                                                 list(pair.holdout_files))), flush=True)


def main(argv: list[str] | None = None) -> int:
    from benchmarks import suite
    from cgidm_core.demo import resolve_model_reference
    from cgidm_core.memorisation import cached_loss_drops

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["vangogh-a", "vangogh-b", "dreambooth"])
    parser.add_argument("--seeds", nargs="+", default=["0", "1"])
    parser.add_argument("--lora", nargs="*", default=None, metavar="RECIPE:SEED",
                        help="pixel LoRA runs as `benchmarks.suite --lora` takes them")
    parser.add_argument("--latent", action="store_true",
                        help="the latent suite's cached pairs instead (not cached here)")
    args = parser.parse_args(argv)
    import torch

    from cgidm_core.suite_pairs import default_cache

    torch.set_num_threads(1)
    if args.latent:
        print("| pair | members' loss drop | hold-outs' loss drop | gap | per-image drop AUC |")
        print("|---|---|---|---|---|")
        latent_rows(default_cache())
        return 0
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
        print(_row(pair.pair_id, cached_loss_drops(suite_args.cache, base, model,
                                                   list(pair.split.members), holdouts)),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
