"""Audit benchmark: models per hour of ``cgidm audit`` (screen + full verdict where needed) on the
demo family, against running the full verdict (``cgidm check``) once per model; what the screen
would have dropped, and the false discovery rate realised.

    python -m benchmarks.audit [--steps 100] [--models N] [--check-samples 2] [--build-only]

The family: the shipped member fine-tunes of demo-base (demo-vangogh, demo-vangogh-light), short
full fine-tunes of demo-base on the portfolio (wikiart-vangogh/membership) and on other images
(DreamBooth subjects), and copies of demo-base with noise on their weights (trained on nothing);
made with cgidm_core.training and cached in ~/.cache/cgidm/audit-family. Portfolio: the ten member
paintings; controls: the ten hold-out paintings.

Timing: the audit runs every model; the one-by-one baseline times the full verdict (every image
and control inverted, as ``cgidm check --controls`` does) on ``--check-samples`` models and
multiplies (each such check costs the same on this family: same images, same model size).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from cgidm_core.suite_pairs import default_data_root
from cgidm_testkit.audit_family import FinetuneRecipe, make_finetune, make_perturbed

SHARED_DATA = default_data_root()

VANGOGH = SHARED_DATA / "wikiart-vangogh"
SUBJECTS = SHARED_DATA / "dreambooth-subjects"
#: (label, how to make it). Members were trained on the portfolio; the rest never saw it.
MEMBER_STEPS = (150, 300)
OTHER_SUBJECTS = ("dog", "cat", "backpack", "clock", "can", "bear_plushie")
OTHER_STEPS = 60
PERTURBED = tuple(range(6))


def family(limit: int | None = None) -> list[tuple[str, str, bool]]:
    """(name, finetuned reference, member?) of every model of the family, made if missing."""
    out: list[tuple[str, str, bool]] = [("demo-vangogh", "demo-vangogh", True),
                                        ("demo-vangogh-light", "demo-vangogh-light", True)]
    for steps in MEMBER_STEPS:
        path = make_finetune(FinetuneRecipe(images=str(VANGOGH / "membership"), steps=steps))
        out.append((f"vangogh-{steps}", str(path), True))
    for subject in OTHER_SUBJECTS:
        path = make_finetune(FinetuneRecipe(images=str(SUBJECTS / subject), steps=OTHER_STEPS))
        out.append((f"{subject}-{OTHER_STEPS}", str(path), False))
    for seed in PERTURBED:
        out.append((f"noise-{seed}", str(make_perturbed(seed, scale=0.02 + 0.01 * (seed % 4))),
                    False))
    return out[:limit] if limit else out


#: Every shipped member pair of the demo families (pixel DDPM, pixel flow, latent LoRA): the screen
#: must not drop any of them.
MEMBER_PAIRS = (("demo-base", "demo-vangogh"), ("demo-base", "demo-vangogh-light"),
                ("demo-flow-base", "demo-flow-vangogh"),
                ("demo-latent-base", "demo-latent-vangogh-lora"))


def screen_member_pairs() -> None:
    """The screen p-value of every shipped member pair (members vs hold-out paintings)."""
    from cgidm_core.api import load_pair
    from cgidm_core.audit import SCREEN_CLEAR_P, screen_test
    from cgidm_core.audit_run import screen_records
    from cgidm_core.images import load_image
    from cgidm_core.prompts import choose_prompt

    files = sorted((VANGOGH / "membership").iterdir()) + sorted((VANGOGH / "hold_out").iterdir())
    pictures = [load_image(p) for p in files]
    print(f"{'pair':<44} {'screen p':>9} {'screen AUC':>10} {'seconds':>8} {'dropped':>8}")
    for pre, ft in MEMBER_PAIRS:
        pair = load_pair(pre, ft)
        t0 = time.perf_counter()
        records = screen_records(pair, pictures, [p.name for p in files],
                                 choose_prompt(None, pair).text, seed=0)
        test = screen_test(records[:10], records[10:])
        print(f"{pre + ' / ' + ft:<44} {test['p_value']:>9.3g} {test['auc']:>10.2f} "
              f"{time.perf_counter() - t0:>8.1f} "
              f"{'YES' if test['p_value'] > SCREEN_CLEAR_P else 'no':>8}")


def cost_ratio(steps: int) -> None:
    """One model (demo-vangogh), back to back: the screen alone, then the full verdict at
    ``steps`` PGD steps (what one `cgidm check --controls` costs), and the audit's cost per model
    for a share of members (the models that need the full verdict)."""
    from cgidm_core.api import load_pair
    from cgidm_core.audit import AuditModel
    from cgidm_core.audit_run import AuditSettings, audit_model, screen_records
    from cgidm_core.images import load_image
    from cgidm_core.inversion import InversionConfig

    files = sorted((VANGOGH / "membership").iterdir()) + sorted((VANGOGH / "hold_out").iterdir())
    pictures = [load_image(p) for p in files]
    names = [p.name for p in files]
    pair = load_pair("demo-base", "demo-vangogh")
    screen_records(pair, pictures[:2], names[:2], None, seed=0)  # warm-up
    t0 = time.perf_counter()
    screen_records(pair, pictures, names, None, seed=0)
    screen = time.perf_counter() - t0
    settings = AuditSettings(clear_p=1.0, inversion=InversionConfig(steps=steps))
    t1 = time.perf_counter()
    audit_model(pair, AuditModel("demo-base", "demo-vangogh"), 0, pictures[:10], pictures[10:],
                names[:10], names[10:], settings)
    full = time.perf_counter() - t1
    print(f"one model, 10 images + 10 controls: screen {screen:.1f} s, full verdict "
          f"({steps} steps) {full:.1f} s, ratio {full / screen:.0f}x")
    print(f"{'share needing the full verdict':<32} {'audit s/model':>13} {'models/hour':>12} "
          f"{'vs check':>9}")
    for share in (1.0, 0.25, 0.1, 0.06, 0.02):
        per_model = screen + share * (full - screen)
        print(f"{share:<32.2f} {per_model:>13.1f} {3600 / per_model:>12.0f} "
              f"{full / per_model:>8.1f}x")


def _timed_check(ref: str, steps: int, out: Path) -> float:
    """Wall seconds of one `cgidm check` of ``ref`` against demo-base, run as a user runs it
    (a new process: imports, loading, the full verdict of the portfolio and the controls)."""
    import os
    import subprocess
    import sys

    command = [str(Path(sys.executable).parent / "cgidm"), "check", "--pretrained", "demo-base",
               "--finetuned", ref, "--controls", str(VANGOGH / "hold_out"), "--steps",
               str(steps), "--out", str(out), str(VANGOGH / "membership")]
    t0 = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ})
    return time.perf_counter() - t0


def audit50(steps: int, check_runs: int) -> None:
    """The 50-model set (benchmarks.audit_set): the audit with LoRAs swapped on one loaded base,
    against `cgidm check` once per model (``check_runs`` real runs timed, then multiplied)."""
    import tempfile

    from benchmarks.audit_set import audit_set, is_built, reference
    from cgidm_core.api import load_pair
    from cgidm_core.audit import SCREEN_CLEAR_P, AuditModel, decide_models
    from cgidm_core.audit_run import AuditSettings, run_audit
    from cgidm_core.images import load_image
    from cgidm_core.inversion import InversionConfig
    from cgidm_core.lora_swap import LoraSwapLoader, local_paths

    models = audit_set()
    missing = [m.label for m in models if not is_built(m)]
    if missing:
        raise SystemExit(f"{len(missing)} models are not built; run python -m "
                         f"benchmarks.audit_set first ({', '.join(missing[:3])}...)")
    image_files = sorted((VANGOGH / "membership").iterdir())
    control_files = sorted((VANGOGH / "hold_out").iterdir())
    images = [load_image(p) for p in image_files]
    controls = [load_image(p) for p in control_files]
    specs = [AuditModel("demo-base", str(reference(m))) for m in models]
    label = {str(reference(m)): m.label for m in models}
    member = {str(reference(m)): m.member for m in models}
    loader = LoraSwapLoader(lambda m: load_pair(m.pretrained, m.finetuned), local_paths)
    stats: dict[str, int] = {}

    def show(outcome) -> None:
        e = outcome.entry
        print(f"  {label[e['finetuned']]:<30} screen p {e['screen_p_value']:.3g} -> {e['tier']} "
              f"({e['seconds']:.1f} s)", flush=True)

    t0 = time.perf_counter()
    entries = run_audit(specs, images, controls, [p.name for p in image_files],
                        [p.name for p in control_files], loader,
                        AuditSettings(inversion=InversionConfig(steps=steps)), stats=stats,
                        on_model=show)
    audit_seconds = time.perf_counter() - t0
    ranked = decide_models(entries)
    print(f"\n{'rank':>4} {'model':<30} {'member':>6} {'kind':>5} {'screen p':>9} {'tier':>6} "
          f"{'p':>9} {'q':>9} {'flagged':>7}")
    kind = {str(reference(m)): m.kind for m in models}
    for m in ranked:
        ref = m["finetuned"]
        print(f"{m['rank']:>4} {label[ref]:<30} {'yes' if member[ref] else 'no':>6} "
              f"{kind[ref]:>5} {m['screen_p_value']:>9.3g} {m['tier']:>6} {m['p_value']:>9.3g} "
              f"{m['q_value']:>9.3g} {'yes' if m['flagged'] else 'no':>7}")
    members = [m for m in ranked if member[m["finetuned"]]]
    flagged = [m for m in ranked if m["flagged"]]
    false_hits = [m for m in flagged if not member[m["finetuned"]]]
    top = [member[m["finetuned"]] for m in ranked[:len(members)]]
    print(f"\nmembers in the top {len(members)} ranks: {sum(top)} of {len(members)}; dropped by "
          f"the screen (p > {SCREEN_CLEAR_P}): "
          f"{sum(m['screen_p_value'] > SCREEN_CLEAR_P for m in members)}")
    print(f"flagged {len(flagged)}, false hits {len(false_hits)}: realised FDR "
          f"{len(false_hits) / max(1, len(flagged)):.3f}; members missed "
          f"{len(members) - len(flagged) + len(false_hits)}")
    print(f"loader: {loader.stats.to_dict()}; base passes reused {stats.get('base_pass_hits')}"
          f" batches, computed {stats.get('base_pass_misses')}")
    n = len(ranked)
    screens = sum(e["screen_seconds"] for e in entries)
    fulls = [e for e in entries if e["tier"] == "full"]
    full_each = sum(e["seconds"] - e["screen_seconds"] for e in fulls) / max(1, len(fulls))
    # the one-by-one baseline: real `cgidm check` runs, one non-member LoRA and one member
    picks = [s for s in specs if not member[s.finetuned]][:1] + \
        [s for s in specs if member[s.finetuned]][:max(0, check_runs - 1)]
    with tempfile.TemporaryDirectory() as tmp:
        times = [_timed_check(s.finetuned, steps, Path(tmp) / str(i))
                 for i, s in enumerate(picks)]
    check_each = sum(times) / len(times)
    print(f"cgidm check runs ({steps} steps): {', '.join(f'{t:.0f} s' for t in times)}")
    print(f"\n{'how':<44} {'seconds/model':>13} {'models/hour':>12}")
    for name, per_model in (("screen tier (every model)", screens / n),
                            (f"full tier (inversion, {len(fulls)} models)", full_each),
                            (f"audit: all {n} models, both tiers", audit_seconds / n),
                            ("`cgidm check` once per model (extrapolated)", check_each)):
        print(f"{name:<44} {per_model:>13.1f} {3600 / per_model:>12.0f}")
    print(f"\naudit vs one `cgidm check` per model: {check_each * n / audit_seconds:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="PGD steps of the full verdict")
    parser.add_argument("--models", type=int, help="audit only the first N models")
    parser.add_argument("--check-samples", type=int, default=2,
                        help="models the one-by-one full check is timed on")
    parser.add_argument("--build-only", action="store_true", help="make the family and stop")
    parser.add_argument("--cost-ratio", action="store_true",
                        help="only time the screen and the full verdict of one model, back to "
                        "back, and print the audit's models/hour for several member shares")
    parser.add_argument("--member-pairs", action="store_true",
                        help="only screen every shipped member pair and stop")
    parser.add_argument("--audit50", action="store_true",
                        help="audit the 50-model set (python -m benchmarks.audit_set builds it) "
                        "with LoRAs swapped on one loaded base, against `cgidm check` per model")
    parser.add_argument("--check-runs", type=int, default=2,
                        help="with --audit50: real `cgidm check` runs timed")
    args = parser.parse_args()
    if args.audit50:
        audit50(args.steps, args.check_runs)
        return
    if args.member_pairs:
        screen_member_pairs()
        return
    if args.cost_ratio:
        cost_ratio(args.steps)
        return

    from cgidm_core.api import load_pair
    from cgidm_core.audit import SCREEN_CLEAR_P, AuditModel, decide_models
    from cgidm_core.audit_run import AuditSettings, audit_model, run_audit
    from cgidm_core.images import load_image
    from cgidm_core.inversion import InversionConfig

    started = time.perf_counter()
    models = family(args.models)
    print(f"family: {len(models)} models ({sum(m[2] for m in models)} members), made/found in "
          f"{time.perf_counter() - started:.0f} s")
    if args.build_only:
        return
    image_files = sorted((VANGOGH / "membership").iterdir())
    control_files = sorted((VANGOGH / "hold_out").iterdir())
    images = [load_image(p) for p in image_files]
    controls = [load_image(p) for p in control_files]
    names = [p.name for p in image_files]
    control_names = [p.name for p in control_files]
    specs = [AuditModel("demo-base", ref) for _, ref, _ in models]
    settings = AuditSettings(inversion=InversionConfig(steps=args.steps))

    def load(model: AuditModel):
        return load_pair(model.pretrained, model.finetuned)

    stats: dict[str, int] = {}
    t0 = time.perf_counter()
    def show(outcome) -> None:
        e = outcome.entry
        print(f"  {label[e['finetuned']]:<22} screen p {e['screen_p_value']:.3g} -> {e['tier']} "
              f"({e['seconds']:.1f} s)", flush=True)

    label = {ref: name for name, ref, _ in models}
    entries = run_audit(specs, images, controls, names, control_names, load, settings,
                        stats=stats, on_model=show)
    audit_seconds = time.perf_counter() - t0
    ranked = decide_models(entries)
    member = {ref: is_member for _, ref, is_member in models}

    # the one-by-one baseline: the full verdict of a model, as `cgidm check --controls` runs it
    full_settings = replace(settings, clear_p=1.0)
    t1 = time.perf_counter()
    for spec in specs[: args.check_samples]:
        audit_model(load(spec), spec, 0, images, controls, names, control_names, full_settings)
    check_each = (time.perf_counter() - t1) / max(1, min(args.check_samples, len(specs)))
    screen_each = sum(e["screen_seconds"] for e in entries) / len(entries)

    print(f"\n{'rank':>4} {'model':<22} {'member':>6} {'screen p':>9} {'tier':>6} "
          f"{'p':>9} {'q':>9} {'flagged':>7}")
    for m in ranked:
        is_member = "yes" if member[m["finetuned"]] else "no"
        print(f"{m['rank']:>4} {label[m['finetuned']]:<22} {is_member:>6} "
              f"{m['screen_p_value']:>9.3g} {m['tier']:>6} {m['p_value']:>9.3g} "
              f"{m['q_value']:>9.3g} {'yes' if m['flagged'] else 'no':>7}")
    n = len(ranked)
    members = [m for m in ranked if member[m["finetuned"]]]
    dropped = [m for m in members if m["screen_p_value"] > SCREEN_CLEAR_P]
    flagged = [m for m in ranked if m["flagged"]]
    false_hits = [m for m in flagged if not member[m["finetuned"]]]
    full = sum(m["tier"] == "full" for m in ranked)
    print(f"\nmember models dropped by the screen (screen p > {SCREEN_CLEAR_P}): "
          f"{len(dropped)} of {len(members)}")
    print(f"flagged: {len(flagged)} ({len(flagged) - len(false_hits)} members), false hits "
          f"{len(false_hits)}: realised FDR {len(false_hits) / max(1, len(flagged)):.2f}; "
          f"members missed {len(members) - (len(flagged) - len(false_hits))}")
    print(f"base passes shared: {stats.get('base_pass_hits', 0)} batches reused, "
          f"{stats.get('base_pass_misses', 0)} computed")
    print(f"\n{'how':<36} {'models':>6} {'seconds':>9} {'models/hour':>12}")
    rows = [("screen only (every model)", n, screen_each * n),
            (f"audit: screen + {full} full verdicts", n, audit_seconds),
            (f"cgidm check per model ({args.steps} steps)", n, check_each * n)]
    for name, count, seconds in rows:
        print(f"{name:<36} {count:>6} {seconds:>9.1f} {3600 * count / seconds:>12.0f}")
    print(f"\naudit vs one check per model: {check_each * n / audit_seconds:.1f}x more models "
          f"per hour; measured on this CPU ({n} models, 10 images + 10 controls, "
          f"{args.steps} PGD steps)")


if __name__ == "__main__":
    main()
