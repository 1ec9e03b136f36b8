#!/usr/bin/env python
"""Speed, peak memory and AUC: the reference layout against cgidm, same machine, same images.

One run measures, on the Van Gogh demo set (10 members + 10 hold-outs from
``../shared/data/wikiart-vangogh``) and one model pair (default: the packaged demo pair):

1. the reference layout and loop (``cgidm_testkit/reference_layout.py``): one image at a time, two
   separately loaded pipelines, independent noise per model, one sample per step, partial image
   decoded and re-encoded, networks not frozen, at ``--steps`` PGD steps;
2. cgidm (``cgidm_core.authenticate`` with ``InversionConfig()`` and batching) at the same
   ``--steps``, at its default step count, and at every ``--curve`` step count (AUC against
   steps, which is how the default was chosen).

Each layout runs in its own fresh process (peak memory must not mix), one after the other, with
the same torch thread count. The reference's similarity is cgidm's ``compute_metrics``, so the
AUCs compare. Prints a markdown table; ``--json FILE`` writes every figure.

    python -m benchmarks.speed                           # 6-7 minutes on 2 quiet CPU cores
    python -m benchmarks.speed --steps 50 --curve 10 25 50 --json speed.json
    python -m benchmarks.speed --family sd --steps 20 --curve 10 20   # tiny random SD pair
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import machine

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT.parent / "shared" / "data" / "wikiart-vangogh"
PROMPT = "sks style"


# -- shared by both children -------------------------------------------------------------------


def _images(members: str, holdout: str, limit: int | None) -> tuple[list, list[str], list[int]]:
    from cgidm_core.images import load_image_folder

    m_names, m_images = load_image_folder(members)
    h_names, h_images = load_image_folder(holdout)
    if limit:
        m_names, m_images = m_names[:limit], m_images[:limit]
        h_names, h_images = h_names[:limit], h_images[:limit]
    labels = [1] * len(m_images) + [0] * len(h_images)
    return m_images + h_images, m_names + h_names, labels


def _aucs(labels: list[int], metrics: list[dict[str, float]]) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    from cgidm_core.similarity import score_from_metric

    names = metrics[0].keys()
    return {
        name: float(roc_auc_score(labels, [score_from_metric(name, m[name]) for m in metrics]))
        for name in names
    }


def _device_peak(device: str) -> int | None:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return None


def _reset_peaks(device: str) -> None:
    import torch

    machine.trim_heap()
    machine.reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


# -- children ----------------------------------------------------------------------------------


def run_reference(args: argparse.Namespace) -> dict[str, Any]:
    """The reference loop over every image, one at a time."""
    import torch

    from cgidm_core.demo import resolve_model_reference
    from cgidm_core.images import image_seed, to_tensor
    from cgidm_core.names import DEFAULT_METRIC, PIXEL_METRICS
    from cgidm_core.similarity import compute_metrics
    from cgidm_testkit.reference_layout import load_reference_layout, reference_recover

    machine.set_threads(args.threads)
    images, names, labels = _images(args.members, args.holdout, args.images)
    load_start = time.perf_counter()
    layout = load_reference_layout(
        resolve_model_reference(args.pretrained), resolve_model_reference(args.finetuned),
        device=args.device,
    )
    load_seconds = time.perf_counter() - load_start
    _reset_peaks(args.device)
    loaded_rss = machine.rss_bytes()
    load_before = machine.load_average()
    metrics: list[dict[str, float]] = []
    start = time.perf_counter()
    for picture in images:
        tensor = to_tensor([picture], layout.image_size)
        out = reference_recover(
            layout, tensor, steps=args.steps, seed=image_seed(tensor[0], args.seed),
            prompt=PROMPT, diagnostics=args.reference_diagnostics,
        )
        values = compute_metrics(out["original"], out["recovered"], out["mask"],
                                 list(PIXEL_METRICS))
        metrics.append({k: v[0] for k, v in values.items()})
    seconds = time.perf_counter() - start
    del torch  # only imported so that the child's import cost is paid before the clock starts
    return {
        "layout": "reference",
        "steps": args.steps,
        "images": len(images),
        "seconds": seconds,
        "seconds_per_image": seconds / len(images),
        "load_seconds": load_seconds,
        "loaded_rss": loaded_rss,
        "peak_rss": machine.peak_rss_bytes(),
        "device_peak": _device_peak(args.device),
        "auc": _aucs(labels, metrics),
        "score_metric": DEFAULT_METRIC,
        "load_average_before": load_before,
        "load_average_after": machine.load_average(),
        "names": names,
        "metrics": metrics,
    }


def run_cgidm(args: argparse.Namespace) -> dict[str, Any]:
    """cgidm's defaults (``authenticate``, ``InversionConfig()``, batching) at each step count."""
    from dataclasses import replace

    from cgidm_core.api import authenticate, load_pair
    from cgidm_core.inversion import InversionConfig
    from cgidm_core.names import DEFAULT_METRIC

    machine.set_threads(args.threads)
    images, names, labels = _images(args.members, args.holdout, args.images)
    load_start = time.perf_counter()
    pair = load_pair(args.pretrained, args.finetuned, device=args.device)
    load_seconds = time.perf_counter() - load_start
    _reset_peaks(args.device)
    loaded_rss = machine.rss_bytes()
    runs = []
    for steps in args.steps_list:
        config = replace(InversionConfig(), steps=steps, seed=args.seed)
        load_before = machine.load_average()
        start = time.perf_counter()
        results = authenticate(pair, images, names=names, prompt=PROMPT if pair.family !=
                               "ddpm" else None, config=config, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        runs.append({
            "steps": steps,
            "seconds": seconds,
            "seconds_per_image": seconds / len(images),
            "auc": _aucs(labels, [r.metrics for r in results]),
            "load_average_before": load_before,
            "load_average_after": machine.load_average(),
            "metrics": [r.metrics for r in results],
        })
    return {
        "layout": "cgidm",
        "images": len(images),
        "batch_size": args.batch_size,
        "default_steps": InversionConfig().steps,
        "config": InversionConfig().to_dict(),
        "load_seconds": load_seconds,
        "loaded_rss": loaded_rss,
        "peak_rss": machine.peak_rss_bytes(),
        "device_peak": _device_peak(args.device),
        "score_metric": DEFAULT_METRIC,
        "names": names,
        "runs": runs,
    }


# -- the parent: orchestrate, render -----------------------------------------------------------


def _tiny_sd_pair(root: Path) -> tuple[Path, Path]:
    from cgidm_testkit import tinymodels

    base = tinymodels.make_tiny_sd(root / "sd_base", sample_size=16)
    return base, tinymodels.make_dreambooth_folder(base, root / "sd_dreambooth")


def _per_hour(seconds_per_image: float) -> float:
    return 3600.0 / seconds_per_image


def _mem(row: dict[str, Any]) -> tuple[str, float]:
    if row.get("device_peak"):
        return f"{row['device_peak'] / 2**20:.0f} MiB (CUDA)", float(row["device_peak"])
    above = (row["peak_rss"] - row["loaded_rss"]) / 2**20
    return (f"{row['peak_rss'] / 2**20:.0f} MiB RSS (+{above:.0f} over loaded)",
            float(row["peak_rss"]))


def fewest_steps_matching(result: dict[str, Any]) -> dict[str, Any] | None:
    """cgidm's cheapest measured step count whose AUC is at least the reference's."""
    ref, ours = result.get("reference"), result["cgidm"]
    if not ref:
        return None
    metric = ours["score_metric"]
    good = [r for r in ours["runs"] if r["auc"][metric] >= ref["auc"][metric]]
    return min(good, key=lambda r: r["seconds_per_image"]) if good else None


def render(result: dict[str, Any]) -> str:
    ref, ours = result.get("reference"), result["cgidm"]
    metric = ours["score_metric"]
    facts = result["machine"]
    lines = [
        f"Measured {facts['date']} on a {facts['cpu_count']}-core CPU ({facts['cpu']}), "
        f"torch {facts['torch']} with {result['threads']} threads, device {result['device']}; "
        f"pair `{result['pretrained']}` / `{result['finetuned']}`; {ours['images']} images "
        f"(members + hold-outs); AUC of the `{metric}` score. Command: `{result['command']}`",
        "",
        "| layout | steps | s / image | images / hour | peak memory | AUC "
        f"({metric}) | images/hour vs reference | peak memory vs reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref_rate = ref_mem = None
    if ref:
        ref_rate = _per_hour(ref["seconds_per_image"])
        mem_text, ref_mem = _mem(ref)
        lines.append(
            f"| reference (one image at a time, two pipelines) | {ref['steps']} | "
            f"{ref['seconds_per_image']:.2f} | {ref_rate:.0f} | {mem_text} | "
            f"{ref['auc'][metric]:.3f} | 1.00x | 1.00x |"
        )
    mem_text, our_mem = _mem(ours)
    shown = {result["steps"]: "equal steps", ours["default_steps"]: "defaults"}
    cheapest = fewest_steps_matching(result)
    if cheapest is not None and cheapest["steps"] not in shown:
        shown[cheapest["steps"]] = "fewest steps with AUC >= reference's"
    for run in ours["runs"]:
        if run["steps"] not in shown:
            continue
        label = shown[run["steps"]]
        if run["steps"] == result["steps"] == ours["default_steps"]:
            label = "equal steps = defaults"
        rate = _per_hour(run["seconds_per_image"])
        speed = f"{rate / ref_rate:.2f}x" if ref_rate else "-"
        memory = f"{our_mem / ref_mem:.2f}x" if ref_mem else "-"
        lines.append(
            f"| cgidm {label} (batch {ours['batch_size']}) | {run['steps']} | "
            f"{run['seconds_per_image']:.2f} | {rate:.0f} | {mem_text} | "
            f"{run['auc'][metric]:.3f} | {speed} | {memory} |"
        )
    if ref:
        extrapolated = ref["seconds_per_image"] * 1000 / ref["steps"]
        lines.append(
            f"| reference at its own default, 1000 steps (time extrapolated linearly, AUC not "
            f"measured) | 1000 | {extrapolated:.1f} | {3600 / extrapolated:.0f} | {_mem(ref)[0]} "
            "| - | - | - |"
        )
    lines += ["", f"AUC against steps (cgidm defaults, batch {ours['batch_size']}):", "",
              "| steps | s / image | " + " | ".join(f"AUC {m}" for m in ours["runs"][0]["auc"])
              + " |",
              "|---|---|" + "---|" * len(ours["runs"][0]["auc"])]
    for run in ours["runs"]:
        lines.append(f"| {run['steps']} | {run['seconds_per_image']:.2f} | "
                     + " | ".join(f"{v:.3f}" for v in run["auc"].values()) + " |")
    if ref:
        lines += ["", f"Reference AUCs at {ref['steps']} steps: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in ref["auc"].items()) + "."]
    loads = [ref["load_average_before"], ref["load_average_after"]] if ref else []
    loads += [x for r in ours["runs"] for x in (r["load_average_before"],
                                                  r["load_average_after"])]
    if loads:
        one_minute = [round(x[0], 2) for x in loads]
        lines += ["", f"1-minute load average during the measurements: min {min(one_minute)}, "
                  f"max {max(one_minute)} (the machine is shared; {facts['cpu_count']} cores)."]
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> list[str]:
    ref, ours = result.get("reference"), result["cgidm"]
    if not ref:
        return []
    metric = ours["score_metric"]
    out = []
    cheapest = fewest_steps_matching(result)
    wanted = {result["steps"], ours["default_steps"]}
    if cheapest is not None:
        wanted.add(cheapest["steps"])
    for run in ours["runs"]:
        if run["steps"] not in wanted:
            continue
        ratio = ref["seconds_per_image"] / run["seconds_per_image"]
        auc_ok = run["auc"][metric] >= ref["auc"][metric]
        met = "met" if ratio >= 5 and auc_ok else "NOT met"
        out.append(
            f"cgidm at {run['steps']} steps vs reference at {ref['steps']}: {ratio:.2f}x images "
            f"per hour, AUC {run['auc'][metric]:.3f} vs {ref['auc'][metric]:.3f} "
            f"(target >= 5x at no lower AUC): {met}"
        )
    default_run = next(r for r in ours["runs"] if r["steps"] == ours["default_steps"])
    at_1000 = ref["seconds_per_image"] * 1000 / ref["steps"]
    out.append(
        f"cgidm defaults ({ours['default_steps']} steps) vs the reference at its own 1000 steps "
        f"(time extrapolated, AUC not measured): "
        f"{at_1000 / default_run['seconds_per_image']:.1f}x images per hour"
    )
    return out


def _child_args(args: argparse.Namespace, pretrained: str, finetuned: str) -> list[str]:
    out = ["-m", "benchmarks.speed", "--pretrained", pretrained, "--finetuned", finetuned,
           "--members", args.members, "--holdout", args.holdout, "--steps", str(args.steps),
           "--seed", str(args.seed), "--batch-size", str(args.batch_size),
           "--device", args.device, "--threads", str(args.threads)]
    if args.images:
        out += ["--images", str(args.images)]
    if args.reference_diagnostics:
        out.append("--reference-diagnostics")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["ddpm", "sd"], default="ddpm",
                        help="ddpm: --pretrained/--finetuned (default the demo pair); sd: a "
                             "tiny random Stable Diffusion DreamBooth pair built on the fly")
    parser.add_argument("--pretrained", default="demo-base")
    parser.add_argument("--finetuned", default="demo-vangogh")
    parser.add_argument("--members", default=str(DATA / "membership"))
    parser.add_argument("--holdout", default=str(DATA / "hold_out"))
    parser.add_argument("--images", type=int, default=None,
                        help="use only the first N members and N hold-outs")
    parser.add_argument("--steps", type=int, default=100,
                        help="PGD steps for the equal-steps comparison (reference and cgidm)")
    parser.add_argument("--curve", type=int, nargs="*", default=[10, 25, 50, 100, 200],
                        help="cgidm step counts for the AUC-against-steps curve")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="cgidm batch size (authenticate's default is 8)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads in every measurement (default: os.cpu_count())")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--reference-diagnostics", action="store_true",
                        help="include the reference's per-image 10-timestep diagnostic pass")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--child", choices=["reference", "cgidm"], help=argparse.SUPPRESS)
    parser.add_argument("--steps-list", type=int, nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "reference":
        print(json.dumps(run_reference(args)))
        return 0
    if args.child == "cgidm":
        print(json.dumps(run_cgidm(args)))
        return 0

    command = "python -m benchmarks.speed " + " ".join(argv if argv is not None else sys.argv[1:])
    from cgidm_core.inversion import InversionConfig

    default_steps = InversionConfig().steps
    steps_list = sorted({args.steps, default_steps, *args.curve})
    with tempfile.TemporaryDirectory(prefix="cgidm-speed-") as tmp:
        pretrained, finetuned = args.pretrained, args.finetuned
        if args.family == "sd":
            pre_path, ft_path = _tiny_sd_pair(Path(tmp))
            pretrained, finetuned = str(pre_path), str(ft_path)
        child = _child_args(args, pretrained, finetuned)
        result: dict[str, Any] = {
            "command": command.strip(), "steps": args.steps, "threads": args.threads,
            "device": args.device, "pretrained": args.pretrained if args.family == "ddpm"
            else "tiny random SD base", "finetuned": args.finetuned if args.family == "ddpm"
            else "tiny random SD DreamBooth fine-tune", "family": args.family,
        }
        started = time.perf_counter()
        if not args.skip_reference:
            print(f"reference layout, {args.steps} steps ...", file=sys.stderr, flush=True)
            result["reference"] = machine.run_child([*child, "--child", "reference"])
        print(f"cgidm, steps {steps_list} ...", file=sys.stderr, flush=True)
        result["cgidm"] = machine.run_child(
            [*child, "--child", "cgidm", "--steps-list", *map(str, steps_list)]
        )
        result["wall_seconds"] = time.perf_counter() - started
    machine.set_threads(args.threads)
    result["machine"] = machine.machine_facts()
    result["verdict"] = verdict(result)
    print(render(result))
    for line in result["verdict"]:
        print("- " + line)
    print(f"\n(total wall time {result['wall_seconds'] / 60:.1f} min)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
