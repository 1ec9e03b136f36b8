#!/usr/bin/env python
"""Per-step time, peak memory and images per hour of CGI-DM on one GPU, SD 1.5 at 512 px.

Builds the real SD 1.5 architecture with random weights directly on the GPU (no download:
``cgidm_testkit/full_size/sd15.py``), as a ``StableDiffusionPair`` of a DreamBooth fine-tune (two
UNets, one float32 VAE, text encoders released after the prompt is encoded), and times cgidm's own
``inversion.invert`` for every configuration: float16 and bfloat16, batch 1, 4, 8, 16 and 32, SDPA
attention (diffusers' default ``AttnProcessor2_0``), channels-last UNets, and with ``--compile``
also ``torch.compile``. One PGD step is one forward and one backward through both UNets.

Per-step time is the median of the steps after the first two (warm-up), read from invert's
progress callback (each step ends with a device sync). What invert spends outside the steps
(VAE encode and two decodes) is the "overhead" per batch. Images per hour at the default step
count = 3600 * batch / (steps * s_per_step + overhead).

For the comparison with the authors' code on the same GPU it also times the reference layout
(``cgidm_testkit/reference_layout.py``: two complete float32 pipelines, SD's safety checker,
networks not frozen, one image at a time, decode and re-encode of the partial image), built with
the same random SD 1.5 weights, and cgidm in float32 too, so that the ratios at equal dtype and at
the dtypes each would use are both in one table. The reference's step time is the difference of two
runs (2 and 2 + k steps) divided by k; its per-image overhead is what remains of the short run.

Every configuration runs under a time budget (invert's cancel hook stops it), and the whole run
stays under ``--budget`` seconds (default 420, so with start-up it ends within 8 minutes). The
compiled configuration comes last: compilation cannot be interrupted, and every figure before it
is already written. The JSON is rewritten after every configuration, so a run stopped from
outside keeps what it measured. Prints a markdown table, writes JSON, and appends the table to
docs/PERFORMANCE.md with the date and GPU name.

    python -m benchmarks.gpu                       # on a CUDA machine
    python -m benchmarks.gpu --compile             # also torch.compile (costs minutes)
    python -m benchmarks.gpu --dry-run             # tiny models on the CPU, seconds: checks logic
    python -m benchmarks.gpu --family sdxl         # SDXL at 1024 px, checkpointing off and on
    python -m benchmarks.gpu --family flux         # FLUX.1-dev FluxPair (VAE, T5, CLIP) at 1024 px
    python -m benchmarks.gpu --family sdxl --dry-run

SDXL and Flux: see ``benchmarks/gpu_families.py`` (their own table; no reference layout).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.gpu_measure import (  # noqa: F401 - re-exported for gpu_families' callers
    PROMPT,
    WARMUP_STEPS,
    Config,
    Measurement,
    _sync,
    _torch_dtype,
    measure,
)

ROOT = Path(__file__).resolve().parents[1]

DOCS = ROOT / "docs" / "PERFORMANCE.md"


# -- building the pair -------------------------------------------------------------------------


def build_pair(dtype_name: str, device: str, tiny: bool) -> Any:
    """A DreamBooth-shaped SD pair in memory: SD 1.5 sizes, or tiny test sizes for --dry-run."""
    import torch

    from cgidm_core.models import StableDiffusionPair

    dtype = _torch_dtype(dtype_name)
    if tiny:
        from cgidm_testkit import tinymodels

        parts = tinymodels.tiny_sd_components(sample_size=8)
        other = tinymodels.perturb_(tinymodels.tiny_sd_components(sample_size=8)["unet"], seed=5)
        tokenizer, scheduler = parts["tokenizer"], parts["scheduler"]
        unet_pre, unet_ft, vae = parts["unet"], other, parts["vae"]
        encoder = parts["text_encoder"]
    else:
        from cgidm_testkit.full_size import sd15

        tokenizer, scheduler = sd15.build_tokenizer(), sd15.build_scheduler()
        unet_pre = sd15.build_unet(0, device=device)
        unet_ft = sd15.build_unet(10, device=device)
        vae = sd15.build_vae(1, device=device)
        encoder = sd15.build_text_encoder(tokenizer, 2, device=device)

    def ready(module: Any, module_dtype: torch.dtype) -> Any:
        module = module.to(device=device)
        if next(module.parameters()).dtype != module_dtype:
            module = module.to(dtype=module_dtype)
        return module.eval().requires_grad_(False)

    pair = StableDiffusionPair(
        vae=ready(vae, torch.float32),
        tokenizer=tokenizer,
        alphas_cumprod=scheduler.alphas_cumprod,
        unet_pretrained=ready(unet_pre, dtype),
        unet_finetuned=ready(unet_ft, dtype),
        text_encoder_pretrained=ready(encoder, dtype),
        text_encoder_finetuned=ready(encoder, dtype),
        device=torch.device(device),
        dtype=dtype,
        finetuned_kind="dreambooth",
        default_prompt=PROMPT,
    )
    pair.conditioning(PROMPT)
    pair.release_text_encoders()  # what load_pair does by default: the prompt is cached
    return pair


def build_reference(device: str, tiny: bool) -> Any:
    """The authors' layout in memory: two complete float32 pipelines, nothing frozen."""
    from cgidm_testkit import reference_layout

    if not tiny:
        return reference_layout.build_sd15_reference_layout(with_safety_checker=True,
                                                            device=device)
    from cgidm_testkit import tinymodels

    def pipe(seed: int) -> Any:
        parts = tinymodels.tiny_sd_components(sample_size=8)
        unet = parts["unet"] if seed == 0 else tinymodels.perturb_(parts["unet"], seed=seed)
        return reference_layout.ReferencePipeline(
            unet=unet.to(device), scheduler=parts["scheduler"], vae=parts["vae"].to(device),
            text_encoder=parts["text_encoder"].to(device), tokenizer=parts["tokenizer"])

    return reference_layout.ReferenceLayout(finetuned=pipe(5), pretrained=pipe(0),
                                            family="stable-diffusion")


def attention_processors(pair: Any) -> list[str]:
    return sorted({type(p).__name__ for p in pair.unet_pretrained.attn_processors.values()})


def set_layout(pair: Any, channels_last: bool, compile_unets: bool, originals: dict) -> None:
    """Put both UNets in the asked memory format, compiled or not (originals kept for undoing)."""
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for name in ("unet_pretrained", "unet_finetuned"):
        unet = originals[name]
        unet.to(memory_format=fmt)
        setattr(pair, name, torch.compile(unet) if compile_unets else unet)


# -- one configuration -------------------------------------------------------------------------


def measure_reference(layout: Any, config: Config, *, device: str, steps: int,
                      default_steps: int, seconds_budget: float) -> Measurement:
    """Time the reference loop on one image: a one-step warm-up, then 2 and 2 + k steps.

    ``reference_recover`` has no progress hook (it is the authors' loop), so the step time is
    the difference of the two timed runs over k; k shrinks to fit the budget.
    """
    import torch

    from cgidm_testkit.reference_layout import reference_recover

    result = Measurement(config=config)
    size = layout.image_size
    image = torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(1)) * 2 - 1
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result.resident_bytes = int(torch.cuda.memory_allocated())
    started = time.perf_counter()

    def timed(n: int) -> float:
        _sync(device)
        began = time.perf_counter()
        reference_recover(layout, image, steps=n, seed=0, prompt=PROMPT)
        _sync(device)
        return time.perf_counter() - began

    try:
        warm = timed(1)  # kernel selection, allocator growth
        left = seconds_budget - (time.perf_counter() - started)
        extra = int(min(steps, max(0.0, left - 2 * warm) / max(warm, 1e-6) - 2))
        if extra < 1:
            result.status, result.note = "budget", "too few steps inside the time budget"
        else:
            short, long_ = timed(2), timed(2 + extra)
            result.steps_timed = extra
            result.seconds_per_step = max((long_ - short) / extra, 1e-9)
            result.overhead_seconds = max(0.0, short - 2 * result.seconds_per_step)
            per_image = default_steps * result.seconds_per_step + result.overhead_seconds
            result.images_per_hour = 3600.0 / per_image
            own = 1000 * result.seconds_per_step + result.overhead_seconds
            result.note = (f"{3600.0 / own:,.0f} images/hour at the reference's own 1000 "
                           "steps; weight gradients on, as there")
    except torch.cuda.OutOfMemoryError:
        result.status, result.note = "OOM", "out of GPU memory"
    finally:
        result.seconds = time.perf_counter() - started
        if device.startswith("cuda"):
            result.peak_bytes = int(torch.cuda.max_memory_allocated())
        for pipe in (layout.finetuned, layout.pretrained):
            for module in pipe.modules():
                module.zero_grad(set_to_none=True)  # its accumulated weight gradients
    return result


# -- the run -----------------------------------------------------------------------------------


def configurations(dtypes: list[str], batches: list[int], compile_too: bool,
                   reference: bool = False) -> list[Config]:
    """Every dtype x batch with channels-last; for the first dtype (while its pair is loaded)
    also one contiguous point, to show what channels-last buys. With ``reference``: cgidm in
    float32 (the reference's dtype) at batch 1 and the largest batch, then the reference layout.
    The compiled point, if asked for, comes last (see the module docstring)."""
    configs = [Config(dtypes[0], b) for b in batches]
    configs.append(Config(dtypes[0], max(batches), channels_last=False))
    configs += [Config(d, b) for d in dtypes[1:] for b in batches]
    if reference:
        if "float32" not in dtypes:
            configs += [Config("float32", b) for b in sorted({1, max(batches)})]
        configs.append(Config("float32", 1, channels_last=False, layout="reference"))
    if compile_too:
        configs.append(Config(dtypes[0], max(batches), compile=True))
    return configs


def run(args: argparse.Namespace,
        on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    import torch

    from cgidm_core.inversion import InversionConfig

    # 1. The device, and what the run records about the machine.
    started = time.perf_counter()
    deadline = started + args.budget
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; use --dry-run to check the script on the CPU")
    default_steps = InversionConfig().steps
    facts = _machine_facts(args, device, default_steps)
    results: list[Measurement] = []
    configs = configurations(args.dtypes, args.batches, args.compile, args.reference)

    def report() -> dict[str, Any]:
        facts["wall_seconds"] = time.perf_counter() - started
        out = {"machine": facts, "results": [asdict(r) for r in results],
               "command": "python -m benchmarks.gpu " + " ".join(args.argv)}
        out["summary"] = summarize(out)
        return out

    # 2. Each configuration in turn, in its share of the budget, one model in memory at a time:
    #    (what, model, original UNets) with what = (layout, dtype).
    loaded: tuple[tuple[str, str], Any, dict | None] | None = None
    build_estimate = 0.0
    for index, config in enumerate(configs):
        pending = configs[index:]
        reserve, skipped = _reserve_or_skip(args, config, pending, deadline, loaded,
                                            build_estimate)
        if skipped is not None:
            results.append(skipped)
            continue
        try:
            if loaded is None or loaded[0] != (config.layout, config.dtype):
                loaded = None  # drop the previous pair before the next
                loaded, build_estimate = _build_for(config, device, args, facts)
            budget = _config_budget(args, config, pending, deadline, reserve)
            measurement = _measure_config(loaded, config, results, device=device,
                                          steps=args.steps, default_steps=default_steps,
                                          budget=budget)
        except Exception as exc:  # noqa: BLE001 - one broken configuration must not lose the rest
            loaded = None  # it may have left the model half-changed
            measurement = Measurement(config=config, status="error",
                                      note=f"{type(exc).__name__}: {exc}"[:300])
        results.append(measurement)
        _progress(measurement, on_result, report)
    return report()


def _machine_facts(args: argparse.Namespace, device: str, default_steps: int) -> dict[str, Any]:
    """The machine, versions and run settings every report starts with."""
    import torch

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run, tiny models)"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "default_steps": default_steps,
        "steps_per_config": args.steps,
        "budget_seconds": args.budget,
        "dry_run": args.dry_run,
        "model": "tiny SD test models" if args.dry_run else "SD 1.5 architecture at 512 px",
    }


def _reserve_or_skip(args: argparse.Namespace, config: Config, pending: list[Config],
                     deadline: float, loaded: Any, build_estimate: float
                     ) -> tuple[float, Measurement | None]:
    """The time held back for a compiled configuration still to come (compilation takes
    minutes; if the whole run cannot hold it, the compiled point gives way to the plain ones),
    and a skipped measurement when this configuration no longer fits the budget."""
    now = time.perf_counter()
    reserve = args.compile_seconds if (
        any(c.compile for c in pending[1:])
        and deadline - now > args.compile_seconds + args.min_config_seconds) else 0.0
    needs_build = loaded is None or loaded[0] != (config.layout, config.dtype)
    available = deadline - now - (build_estimate if needs_build else 0.0)
    if available < args.min_config_seconds or (
        not config.compile and available - reserve < args.min_config_seconds
    ):
        return reserve, Measurement(config=config, status="skipped",
                                    note="whole-run budget spent")
    if config.compile and available < args.compile_seconds:
        return reserve, Measurement(config=config, status="skipped",
                                    note=f"needs {args.compile_seconds:.0f} s to compile")
    return reserve, None


def _build_for(config: Config, device: str, args: argparse.Namespace, facts: dict[str, Any]
               ) -> tuple[tuple[tuple[str, str], Any, dict | None], float]:
    """Build the pair a configuration runs on (after freeing the previous one's memory);
    records its build time and weight bytes. Returns (loaded, seconds it took)."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    built = time.perf_counter()
    name = f"{config.layout} {config.dtype}"
    if config.layout == "reference":
        pair = build_reference(device, tiny=args.dry_run)
        originals = None
        weights = pair.parameter_bytes()
    else:
        pair = build_pair(config.dtype, device, tiny=args.dry_run)
        originals = {n: getattr(pair, n) for n in ("unet_pretrained", "unet_finetuned")}
        weights = pair.memory_bytes()
        facts["attention_processors"] = attention_processors(pair)
    seconds = time.perf_counter() - built
    facts.setdefault("build_seconds", {})[name] = seconds
    facts.setdefault("weights_bytes", {})[name] = weights
    return ((config.layout, config.dtype), pair, originals), seconds


def _config_budget(args: argparse.Namespace, config: Config, pending: list[Config],
                   deadline: float, reserve: float) -> float:
    """Seconds for this configuration: a compiled one gets its compile allowance; a plain one
    an equal share of what is left (less the reserve), within the per-config limits."""
    if config.compile:
        return min(args.compile_seconds, deadline - time.perf_counter())
    plain_left = sum(1 for c in pending if not c.compile)
    share = (deadline - time.perf_counter() - reserve) / plain_left
    return max(args.min_config_seconds, min(args.config_seconds, share))


def _measure_config(loaded: tuple[tuple[str, str], Any, dict | None], config: Config,
                    results: list[Measurement], *, device: str, steps: int, default_steps: int,
                    budget: float) -> Measurement:
    """Measure one configuration on the loaded pair; a plain configuration passes the overhead
    measured for its plain twin as a hint to the compiled one."""
    _, pair, originals = loaded
    if config.layout == "reference":
        return measure_reference(pair, config, device=device, steps=steps,
                                 default_steps=default_steps, seconds_budget=budget)
    set_layout(pair, config.channels_last, config.compile, originals)
    plain = [r.overhead_seconds for r in results
             if r.config == Config(config.dtype, config.batch, config.channels_last)]
    return measure(pair, config, device=device, steps=steps, default_steps=default_steps,
                   seconds_budget=budget, overhead_hint=plain[0] if plain else None)


def _progress(measurement: Measurement, on_result: Callable | None, report: Callable) -> None:
    print(f"{measurement.config.label}: {measurement.status} "
          f"{measurement.seconds_per_step or float('nan'):.3f} s/step {measurement.note}",
          file=sys.stderr, flush=True)
    if on_result is not None:
        on_result(report())


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Ratios against the reference layout: images per hour at equal steps, at the reference's
    own 1000 steps, and memory (resident before the run, and peak during it)."""
    rows = [r for r in report["results"] if r["images_per_hour"]]
    ref = next((r for r in rows if r["config"]["layout"] == "reference"), None)
    ours = [r for r in rows if r["config"]["layout"] == "cgidm"]
    if ref is None or not ours:
        return {}
    default_steps = report["machine"]["default_steps"]
    ref_own = 3600.0 / (1000 * ref["seconds_per_step"] + (ref["overhead_seconds"] or 0.0))
    summary: dict[str, Any] = {"reference_images_per_hour_at_default_steps":
                               ref["images_per_hour"],
                               "reference_images_per_hour_at_1000_steps": ref_own}
    for name, candidates in (("best", ours),
                             ("float32", [r for r in ours if r["config"]["dtype"] == "float32"])):
        if not candidates:
            continue
        best = max(candidates, key=lambda r: r["images_per_hour"])
        entry = {"config": best["config"], "images_per_hour": best["images_per_hour"],
                 f"vs_reference_at_{default_steps}_steps":
                     best["images_per_hour"] / ref["images_per_hour"],
                 "vs_reference_at_1000_steps": best["images_per_hour"] / ref_own}
        summary[name] = entry
    fp32 = [r for r in ours if r["config"]["dtype"] == "float32" and r["resident_bytes"]]
    if fp32 and ref["resident_bytes"]:
        summary["resident_memory_ratio_float32"] = (
            min(r["resident_bytes"] for r in fp32) / ref["resident_bytes"])
        same_batch = [r for r in fp32 if r["config"]["batch"] == 1 and r["peak_bytes"]]
        if same_batch and ref["peak_bytes"]:
            summary["peak_memory_ratio_float32_batch_1"] = (
                same_batch[0]["peak_bytes"] / ref["peak_bytes"])
    return summary


def render(report: dict[str, Any]) -> str:
    facts = report["machine"]
    lines = [
        f"### {facts['gpu']}, {facts['date']}",
        "",
        f"torch {facts['torch']} (CUDA {facts['cuda']}), attention "
        f"{', '.join(facts.get('attention_processors', []))}; {facts['model']}, "
        "random weights, DreamBooth pair (two UNets, float32 VAE, text encoders released); "
        f"images per hour at the default {facts['default_steps']} steps. Whole run "
        f"{facts['wall_seconds']:.0f} s. Command: `{report['command'].strip()}`",
        "",
        "| dtype | batch | layout | s / PGD step | steps timed | overhead / batch (s) "
        "| resident (GiB) | peak memory (GiB) | images / hour | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        c = r["config"]
        if c.get("layout") == "reference":
            layout = "**reference layout** (two full pipelines, one image)"
        else:
            layout = ("channels-last" if c["channels_last"] else "contiguous") + (
                " + compile" if c["compile"] else "")

        def fmt(value: float | None, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30
        resident = None if r.get("resident_bytes") is None else r["resident_bytes"] / 2**30
        status = r["status"] + (f" ({r['note']})" if r["note"] else "")
        lines.append(
            f"| {c['dtype']} | {c['batch']} | {layout} | {fmt(r['seconds_per_step'], '.3f')} | "
            f"{r['steps_timed']} | {fmt(r['overhead_seconds'], '.2f')} | "
            f"{fmt(resident, '.2f')} | {fmt(peak, '.1f')} | "
            f"{fmt(r['images_per_hour'], ',.0f')} | {status} |"
        )
    lines += render_summary(report.get("summary") or {}, facts["default_steps"])
    return "\n".join(lines)


def render_summary(summary: dict[str, Any], default_steps: int) -> list[str]:
    if not summary:
        return []
    lines = ["", "Against the reference layout on the same machine:"]
    for name, what in (("best", "cgidm's fastest configuration"),
                       ("float32", "cgidm in float32 (the reference's dtype)")):
        entry = summary.get(name)
        if not entry:
            continue
        c = entry["config"]
        lines.append(
            f"- {what} ({c['dtype']}, batch {c['batch']}): {entry['images_per_hour']:,.0f} "
            f"images/hour = **{entry[f'vs_reference_at_{default_steps}_steps']:.1f}x** the "
            f"reference at equal steps ({default_steps}), "
            f"**{entry['vs_reference_at_1000_steps']:.0f}x** the reference at its own 1000 steps")
    if "resident_memory_ratio_float32" in summary:
        lines.append(f"- memory held by the loaded float32 pair: "
                     f"**{summary['resident_memory_ratio_float32']:.3f}x** the reference's")
    if "peak_memory_ratio_float32_batch_1" in summary:
        lines.append(f"- peak memory during the run, float32, one image: "
                     f"**{summary['peak_memory_ratio_float32_batch_1']:.3f}x** the reference's "
                     "(which also keeps weight gradients)")
    return lines


def append_to_docs(markdown: str, docs: Path) -> None:
    text = docs.read_text() if docs.exists() else "# Performance\n"
    if not text.endswith("\n"):
        text += "\n"
    docs.write_text(text + "\n" + markdown + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="default: float16 bfloat16 (dry run: float32 bfloat16)")
    parser.add_argument("--batches", nargs="+", type=int, default=None,
                        help="default: 1 4 8 16 32 (dry run: 1 2); a batch that does not fit "
                             "is recorded as OOM and the run goes on")
    parser.add_argument("--steps", type=int, default=12,
                        help="PGD steps per configuration (the first two are warm-up)")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile point")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="leave out the reference layout and the float32 comparison points")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all configurations (default 420; dry run 60)")
    parser.add_argument("--config-seconds", type=float, default=45.0,
                        help="at most this long per configuration")
    parser.add_argument("--min-config-seconds", type=float, default=5.0)
    parser.add_argument("--compile-seconds", type=float, default=240.0,
                        help="time a compiled configuration may take (compilation included)")
    parser.add_argument("--from-json", default=None, metavar="FILE",
                        help="measure nothing: render FILE (written by an earlier run, perhaps "
                             "stopped from outside) and append it to --docs")
    parser.add_argument("--family", choices=["sd15", "sdxl", "flux"], default="sd15",
                        help="sdxl/flux: benchmarks/gpu_families.py (default batches 1 2 4 8 "
                        "SDXL, 1 2 4 Flux; dtypes float16 bfloat16 SDXL, bfloat16 Flux)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny models on the CPU: checks the script in seconds")
    parser.add_argument("--json", default=None,
                        help="write the figures here (default gpu-benchmark.json; none in a dry "
                             "run unless given)")
    parser.add_argument("--docs", default=None,
                        help="append the table to this markdown file (default "
                             "docs/PERFORMANCE.md; not in a dry run unless given)")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.family != "sd15":
        return _main_family(args)
    if args.dtypes is None:
        args.dtypes = ["float32", "bfloat16"] if args.dry_run else ["float16", "bfloat16"]
    if args.batches is None:
        args.batches = [1, 2] if args.dry_run else [1, 4, 8, 16, 32]
    if args.budget is None:
        args.budget = 60.0 if args.dry_run else 420.0
    if args.dry_run and args.steps == parser.get_default("steps"):
        args.steps = 4
    if args.dry_run:
        args.config_seconds = min(args.config_seconds, 10.0)
        args.min_config_seconds = min(args.min_config_seconds, 1.0)
        args.compile_seconds = min(args.compile_seconds, 30.0)
    json_path = args.json or (None if args.dry_run else "gpu-benchmark.json")
    docs = args.docs or (None if args.dry_run else str(DOCS))

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report["summary"] = summarize(report)
        markdown = render(report)
        print(markdown)
        if args.docs:
            append_to_docs(markdown, Path(args.docs))
        return 0

    def save(partial: dict[str, Any]) -> None:
        if json_path:
            Path(json_path).write_text(json.dumps(partial, indent=2) + "\n")

    report = run(args, on_result=save)
    markdown = render(report)
    print(markdown)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    if docs:
        append_to_docs(markdown, Path(docs))
    return 0


def _main_family(args: argparse.Namespace) -> int:
    """SDXL or Flux (benchmarks/gpu_families.py): their own defaults, table and JSON."""
    import os

    from benchmarks import gpu_families

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.dtypes is None:
        args.dtypes = (["float32", "bfloat16"] if args.dry_run else
                       ["bfloat16"] if args.family == "flux" else ["float16", "bfloat16"])
    if args.batches is None:
        args.batches = [1, 2] if args.dry_run else (
            [1, 2, 4] if args.family == "flux" else [1, 2, 4, 8])
    if args.budget is None:
        args.budget = 60.0 if args.dry_run else 420.0
    if args.dry_run:
        args.steps = min(args.steps, 4)
        args.config_seconds = min(args.config_seconds, 10.0)
        args.min_config_seconds = min(args.min_config_seconds, 1.0)
    report = gpu_families.run(args)
    markdown = gpu_families.render(report)
    print(markdown)
    json_path = args.json or (None if args.dry_run else f"gpu-{args.family}.json")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    docs = args.docs or (None if args.dry_run else str(DOCS))
    if docs:
        append_to_docs(markdown, Path(docs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
