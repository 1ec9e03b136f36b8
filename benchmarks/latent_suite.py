"""The latent family's recipe pairs: fine-tune (cached) and measure members vs hold-out.

    python -m benchmarks.latent_suite --list
    python -m benchmarks.latent_suite --recipes lora-attn-r16 --steps 1000 --seeds 0 \\
        --pgd-steps 30

Each pair (``cgidm_core.latent_suite_pairs``) is fine-tuned once into
``~/.cache/cgidm/suite/latent/<recipe>-s<seed>-<hash>/<steps>/`` and scored once by
``cgidm eval --method evidence --json`` (the verdict's score) as a user would run it: the LoRA or
pipeline loaded from its file, its prompt read from its own metadata. The same per-image JSON
holds every component of the verdict's score, so one inversion run gives the AUC of the verdict
(``evidence``), of CGI-DM's similarity alone (``cgidm``: masked SSIM of the recovery), and of
the cheap scores (``loss``: the loss attack, ``contrast``: CGI-DM's objective at the original),
each with a stratified bootstrap 95 % interval. The table also gives each pair's recipe group
(for leave-one-group-out selection), its training steps and the drop of the members' loss.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from cgidm_core import latent_suite_pairs as lsp
from cgidm_core.stats import evaluate_scores

#: The per-image values each column's AUC is computed from (higher = member).
COLUMNS = {
    "evidence": lambda row: row["score"],
    "cgidm": lambda row: row["metrics"]["ssim"],
    "loss": lambda row: row["attack_scores"]["loss"],
    "contrast": lambda row: row["attack_scores"]["contrast"],
}


def results_file(pair: lsp.LatentSuitePair, cache: Path, pgd_steps: int) -> Path:
    return pair.run_dir(cache) / str(pair.steps) / f"evidence-{pgd_steps}.json"


def evaluate(pair: lsp.LatentSuitePair, cache: Path, pgd_steps: int, threads: int) -> Path:
    """Run ``cgidm eval --method evidence`` on the pair (cached by PGD steps)."""
    out = results_file(pair, cache, pgd_steps)
    if out.is_file():
        return out
    members, holdout = pair.members[0].parent, pair.holdout_files[0].parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "cgidm.cli", "eval", "--pretrained", pair.base,
                    "--finetuned", str(pair.model_dir(cache)), "--device", "cpu",
                    "--members", str(members), "--holdout", str(holdout),
                    "--method", "evidence", "--steps", str(pgd_steps), "--json", str(out)],
                   check=True, env=env)
    return out


def summarise(pair: lsp.LatentSuitePair, cache: Path, results: Path) -> dict:
    """One table row: group, strength, and AUC [CI] of each column."""
    doc = json.loads(results.read_text())
    facts = json.loads(pair.facts_file(cache).read_text())
    row = {"pair": pair.pair_id, "group": pair.group, "steps": pair.steps,
           "members_loss_drop": facts["members_loss_drop"],
           "members_loss_drop_relative": facts["members_loss_drop_relative"],
           "pgd_steps": doc["settings"]["inversion"]["steps"], "auc": {}}
    for name, value in COLUMNS.items():
        members = [value(r) for r in doc["images"] if r["set"] == "member"]
        holdout = [value(r) for r in doc["images"] if r["set"] == "holdout"]
        report = evaluate_scores(members, holdout, n_bootstrap=2000, seed=0)
        row["auc"][name] = ([round(report.auc, 3), round(report.auc_ci_low, 3),
                             round(report.auc_ci_high, 3)]
                            if report.auc_ci_low is not None else [round(report.auc, 3)])
    return row


def table(rows: list[dict]) -> str:
    head = ("| pair | group | steps | members' loss drop | " + " | ".join(COLUMNS) + " |\n|"
            + "---|" * (4 + len(COLUMNS)) + "\n")
    lines = []
    for r in rows:
        cells = [f"{a[0]:.2f} [{a[1]:.2f}, {a[2]:.2f}]" if len(a) == 3 else f"{a[0]:.2f}"
                 for a in (r["auc"][c] for c in COLUMNS)]
        lines.append(f"| {r['pair']} | {r['group']} | {r['steps']} | "
                     f"{r['members_loss_drop']:.4f} ({100 * r['members_loss_drop_relative']:.1f} %)"
                     f" | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="*", default=None, choices=list(lsp.RECIPES))
    parser.add_argument("--steps", nargs="*", type=int, default=None)
    parser.add_argument("--seeds", nargs="*", type=int, default=None)
    parser.add_argument("--pgd-steps", type=int, default=100,
                        help="CGI-DM inversion steps (the default preset's 100 unless CPU-bound)")
    parser.add_argument("--cache", type=Path, default=lsp.default_cache())
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--no-eval", action="store_true", help="only fine-tune")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    pairs = lsp.latent_suite_pairs(recipes=tuple(args.recipes or ()) or None,
                                   steps=tuple(args.steps or ()) or None,
                                   seeds=tuple(args.seeds or ()) or None)
    if args.list:
        for pair in pairs:
            state = "trained" if pair.facts_file(args.cache).is_file() else "not trained"
            print(f"{pair.pair_id:<40} {pair.group:<18} {state}  {pair.model_dir(args.cache)}")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for pair in pairs:
        if not pair.facts_file(args.cache).is_file():
            lsp.train_run(pair, args.cache)
        if args.no_eval:
            continue
        rows.append(summarise(pair, args.cache,
                              evaluate(pair, args.cache, args.pgd_steps, args.threads)))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    if rows:
        print(table(rows))
    if args.json and rows:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
