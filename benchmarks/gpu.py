#!/usr/bin/env python
"""Per-step time, peak memory and images per hour of CGI-DM on one GPU, SD 1.5 at 512 px.

Builds the real SD 1.5 architecture with random weights directly on the GPU (no download:
``benchmarks/sd15.py``), as a ``StableDiffusionPair`` of a DreamBooth fine-tune (two UNets, one
float32 VAE, text encoders released after the prompt is encoded), and times cgidm's own
``inversion.invert`` for every configuration: float16 and bfloat16, batch 1, 4 and 8, SDPA
attention (diffusers' default ``AttnProcessor2_0``), channels-last UNets, and with ``--compile``
also ``torch.compile``. One PGD step is one forward and one backward through both UNets.

Per-step time is the median of the steps after the first two (warm-up), read from invert's
progress callback (each step ends with a device sync). What invert spends outside the steps
(VAE encode and two decodes) is the "overhead" per batch. Images per hour at the default step
count = 3600 * batch / (steps * s_per_step + overhead).

Every configuration runs under a time budget (invert's cancel hook stops it), and the whole run
stays under ``--budget`` seconds (default 420, so with start-up it ends within 8 minutes).
Prints a markdown table, writes JSON, and appends the table to docs/PERFORMANCE.md with the date
and GPU name.

    python benchmarks/gpu.py                       # on a CUDA machine
    python benchmarks/gpu.py --compile             # also torch.compile (costs minutes)
    python benchmarks/gpu.py --dry-run             # tiny models on the CPU, seconds: checks logic
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "sks style"
DOCS = ROOT / "docs" / "PERFORMANCE.md"
WARMUP_STEPS = 2


@dataclass
class Config:
    dtype: str
    batch: int
    channels_last: bool = True
    compile: bool = False

    @property
    def label(self) -> str:
        parts = [self.dtype, f"batch {self.batch}"]
        parts.append("channels-last" if self.channels_last else "contiguous")
        if self.compile:
            parts.append("torch.compile")
        return ", ".join(parts)


@dataclass
class Measurement:
    config: Config
    status: str = "ok"  # ok | budget (stopped early, figures from the steps done) | skipped | OOM
    steps_timed: int = 0
    seconds_per_step: float | None = None
    overhead_seconds: float | None = None
    peak_bytes: int | None = None
    images_per_hour: float | None = None
    seconds: float = 0.0
    note: str = ""
    step_seconds: list[float] = field(default_factory=list)


# -- building the pair -------------------------------------------------------------------------


def _torch_dtype(name: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def build_pair(dtype_name: str, device: str, tiny: bool) -> Any:
    """A DreamBooth-shaped SD pair in memory: SD 1.5 sizes, or tiny test sizes for --dry-run."""
    import torch

    from cgidm_core.models import StableDiffusionPair

    dtype = _torch_dtype(dtype_name)
    if tiny:
        from tests import tinymodels

        parts = tinymodels.tiny_sd_components(sample_size=8)
        other = tinymodels.perturb_(tinymodels.tiny_sd_components(sample_size=8)["unet"], seed=5)
        tokenizer, scheduler = parts["tokenizer"], parts["scheduler"]
        unet_pre, unet_ft, vae = parts["unet"], other, parts["vae"]
        encoder = parts["text_encoder"]
    else:
        from benchmarks import sd15

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


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(pair: Any, config: Config, *, device: str, steps: int, default_steps: int,
            seconds_budget: float, overhead_hint: float | None = None) -> Measurement:
    """Run cgidm's invert on a batch of random images; stop when the budget is spent.

    A compiled configuration compiles during its first step, once per process; its per-batch
    overhead is taken from ``overhead_hint`` (the same batch uncompiled: the VAE work is equal).
    """
    import torch

    from cgidm_core.errors import Cancelled
    from cgidm_core.inversion import InversionConfig, invert

    result = Measurement(config=config)
    generator = torch.Generator().manual_seed(config.batch)
    images = torch.rand((config.batch, 3, pair.image_size, pair.image_size),
                        generator=generator) * 2 - 1
    cond = pair.conditioning(PROMPT)
    marks: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds_budget

    def progress(done: int, _total: int) -> None:
        marks.append(time.perf_counter())  # invert syncs each step (losses go to the CPU)

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    try:
        invert(pair, images, cond, InversionConfig(steps=steps), seeds=list(range(config.batch)),
               progress=progress, should_cancel=lambda: time.perf_counter() > deadline,
               cancel_every=1)
        _sync(device)
    except Cancelled:
        result.status = "budget"
    except torch.cuda.OutOfMemoryError:
        result.status = "OOM"
        result.note = "out of GPU memory"
    finally:
        ended = time.perf_counter()
        result.seconds = ended - started
        if device.startswith("cuda"):
            result.peak_bytes = int(torch.cuda.max_memory_allocated())
    durations = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    timed = durations[WARMUP_STEPS - 1:] if len(durations) >= WARMUP_STEPS else []
    result.step_seconds = durations
    if not timed:
        if result.status == "ok":
            result.status = "budget"
        result.note = result.note or "too few steps inside the time budget"
        return result
    result.steps_timed = len(timed)
    result.seconds_per_step = statistics.median(timed)
    if config.compile:
        result.note = f"compilation + first step {marks[0] - started:.0f} s, once per process"
        result.overhead_seconds = overhead_hint
    elif result.status == "ok":
        # Encode before the first step, two decodes after the last. The first step's own
        # warm-up (kernel selection) also lands here, so the overhead errs on the high side.
        before = max(0.0, marks[0] - started - result.seconds_per_step)
        result.overhead_seconds = before + (ended - marks[-1])
    else:
        result.note = result.note or "stopped by the time budget; overhead not measured"
    per_batch = default_steps * result.seconds_per_step + (result.overhead_seconds or 0.0)
    result.images_per_hour = 3600.0 * config.batch / per_batch
    return result


# -- the run -----------------------------------------------------------------------------------


def configurations(dtypes: list[str], batches: list[int], compile_too: bool) -> list[Config]:
    """Every dtype x batch with channels-last; for the first dtype (while its pair is loaded)
    also one contiguous point, to show what channels-last buys, and optionally a compiled one."""
    configs = [Config(dtypes[0], b) for b in batches]
    configs.append(Config(dtypes[0], max(batches), channels_last=False))
    if compile_too:
        configs.append(Config(dtypes[0], max(batches), compile=True))
    configs += [Config(d, b) for d in dtypes[1:] for b in batches]
    return configs


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cgidm_core.inversion import InversionConfig

    started = time.perf_counter()
    deadline = started + args.budget
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; use --dry-run to check the script on the CPU")
    default_steps = InversionConfig().steps
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run, tiny models)"
    results: list[Measurement] = []
    facts: dict[str, Any] = {
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
    configs = configurations(args.dtypes, args.batches, args.compile)
    loaded: tuple[str, Any, dict] | None = None  # (dtype, pair, original UNets): one at a time
    build_estimate = 0.0
    for index, config in enumerate(configs):
        now = time.perf_counter()
        pending = configs[index:]
        # Time held back for a compiled configuration still to come (compilation takes minutes).
        reserve = args.compile_seconds if any(c.compile for c in pending[1:]) else 0.0
        needs_build = loaded is None or loaded[0] != config.dtype
        available = deadline - now - (build_estimate if needs_build else 0.0)
        if available < args.min_config_seconds or (
            not config.compile and available - reserve < args.min_config_seconds
        ):
            results.append(Measurement(config=config, status="skipped",
                                       note="whole-run budget spent"))
            continue
        if config.compile and available < args.compile_seconds:
            results.append(Measurement(config=config, status="skipped",
                                       note=f"needs {args.compile_seconds:.0f} s to compile"))
            continue
        try:
            if needs_build:
                loaded = pair = originals = None  # drop the previous pair before the next
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                built = time.perf_counter()
                pair = build_pair(config.dtype, device, tiny=args.dry_run)
                originals = {n: getattr(pair, n) for n in ("unet_pretrained", "unet_finetuned")}
                loaded = (config.dtype, pair, originals)
                build_estimate = time.perf_counter() - built
                facts.setdefault("build_seconds", {})[config.dtype] = build_estimate
                facts.setdefault("weights_bytes", {})[config.dtype] = pair.memory_bytes()
                facts["attention_processors"] = attention_processors(pair)
                del pair, originals
            _, pair, originals = loaded
            set_layout(pair, config.channels_last, config.compile, originals)
            if config.compile:
                budget = min(args.compile_seconds, deadline - time.perf_counter())
            else:
                plain_left = sum(1 for c in pending if not c.compile)
                share = (deadline - time.perf_counter() - reserve) / plain_left
                budget = max(args.min_config_seconds, min(args.config_seconds, share))
            plain = [r.overhead_seconds for r in results
                     if r.config == Config(config.dtype, config.batch, config.channels_last)]
            measurement = measure(pair, config, device=device, steps=args.steps,
                                  default_steps=default_steps, seconds_budget=budget,
                                  overhead_hint=plain[0] if plain else None)
            del pair, originals
        except (RuntimeError, ValueError) as exc:  # e.g. a dtype the device cannot do
            measurement = Measurement(config=config, status="error", note=str(exc)[:200])
        results.append(measurement)
        print(f"{config.label}: {measurement.status} "
              f"{measurement.seconds_per_step or float('nan'):.3f} s/step", file=sys.stderr,
              flush=True)
    facts["wall_seconds"] = time.perf_counter() - started
    return {"machine": facts, "results": [asdict(r) for r in results],
            "command": "python benchmarks/gpu.py " + " ".join(args.argv)}


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
        "| peak memory (GiB) | images / hour | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        c = r["config"]
        layout = ("channels-last" if c["channels_last"] else "contiguous") + (
            " + compile" if c["compile"] else "")

        def fmt(value: float | None, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30
        status = r["status"] + (f" ({r['note']})" if r["note"] else "")
        lines.append(
            f"| {c['dtype']} | {c['batch']} | {layout} | {fmt(r['seconds_per_step'], '.3f')} | "
            f"{r['steps_timed']} | {fmt(r['overhead_seconds'], '.2f')} | {fmt(peak, '.1f')} | "
            f"{fmt(r['images_per_hour'], ',.0f')} | {status} |"
        )
    return "\n".join(lines)


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
                        help="default: 1 4 8 (dry run: 1 2)")
    parser.add_argument("--steps", type=int, default=12,
                        help="PGD steps per configuration (the first two are warm-up)")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile point")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all configurations (default 420; dry run 60)")
    parser.add_argument("--config-seconds", type=float, default=45.0,
                        help="at most this long per configuration")
    parser.add_argument("--min-config-seconds", type=float, default=5.0)
    parser.add_argument("--compile-seconds", type=float, default=180.0,
                        help="time a compiled configuration may take (compilation included)")
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
    if args.dtypes is None:
        args.dtypes = ["float32", "bfloat16"] if args.dry_run else ["float16", "bfloat16"]
    if args.batches is None:
        args.batches = [1, 2] if args.dry_run else [1, 4, 8]
    if args.budget is None:
        args.budget = 60.0 if args.dry_run else 420.0
    if args.dry_run and args.steps == parser.get_default("steps"):
        args.steps = 4
    if args.dry_run:
        args.config_seconds = min(args.config_seconds, 10.0)
        args.min_config_seconds = min(args.min_config_seconds, 1.0)
    json_path = args.json or (None if args.dry_run else "gpu-benchmark.json")
    docs = args.docs or (None if args.dry_run else str(DOCS))

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = run(args)
    markdown = render(report)
    print(markdown)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    if docs:
        append_to_docs(markdown, Path(docs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
