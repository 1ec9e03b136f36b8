"""``benchmarks/gpu.py --family sdxl|flux``: images per hour and peak memory of the big families.

SDXL: the real SDXL base 1.0 architecture (``benchmarks/sdxl_arch.py``) with random weights,
built on the GPU (no download), as a ``StableDiffusionXLPair`` of a DreamBooth fine-tune (two
UNets, float32 VAE, both text encoders released after the prompt), timed through cgidm's own
``inversion.invert`` at the native 1024 px, for float16 and bfloat16, each batch size, with
gradient checkpointing off and on. Same timing rules as SD (``gpu.measure``).

Flux: this was written before the Flux pair (``cgidm_core.models.flux``) was merged, so the
PGD's step is timed by hand on two random Flux.1-dev transformers (12 B parameters each,
bfloat16, ``benchmarks/flux_arch.py``): the contrast of the two velocity losses on the same
packed latent and its gradient with respect to that latent, at 1024 px (4096 image tokens + 512
T5 tokens). Images per hour count these steps only (VAE and T5 encoding are per batch, not per
step, and not included); timing it through ``invert`` with a full-size FluxPair is still to do.

``--dry-run`` runs both at a tiny scale on the CPU (seconds), as a test does.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu  # noqa: E402

TINY = 0.1


def build_sdxl_pair(dtype_name: str, device: str, tiny: bool) -> Any:
    """A DreamBooth-shaped SDXL pair in memory: full size on the GPU, or tiny for --dry-run."""
    import torch

    from benchmarks import sd15, sdxl_arch
    from cgidm_core.models.sdxl import SDXLTextEncoders, StableDiffusionXLPair

    dtype = gpu._torch_dtype(dtype_name)
    scale = TINY if tiny else 1.0
    tokenizer = sd15.build_tokenizer()

    def ready(module: Any, module_dtype: torch.dtype) -> Any:
        module = module.to(device=device)
        if next(module.parameters()).dtype != module_dtype:
            module = module.to(dtype=module_dtype)
        return module.eval().requires_grad_(False)

    encoders = ready(SDXLTextEncoders(*sdxl_arch.build_text_encoders(
        tokenizer, device=device, scale=scale)), dtype)
    pair = StableDiffusionXLPair(
        vae=ready(sdxl_arch.build_vae(1, device=device, scale=scale), torch.float32),
        tokenizer=tokenizer, tokenizer_2=tokenizer,
        alphas_cumprod=sd15.build_scheduler().alphas_cumprod,
        unet_pretrained=ready(sdxl_arch.build_unet(0, device=device, scale=scale), dtype),
        unet_finetuned=ready(sdxl_arch.build_unet(10, device=device, scale=scale), dtype),
        text_encoder_pretrained=encoders, text_encoder_finetuned=encoders,
        device=torch.device(device), dtype=dtype, finetuned_kind="dreambooth",
        default_prompt=gpu.PROMPT,
    )
    pair.conditioning(gpu.PROMPT)
    pair.release_text_encoders()
    return pair


def build_flux_transformers(dtype_name: str, device: str, tiny: bool) -> list[Any]:
    from benchmarks import flux_arch

    dtype = gpu._torch_dtype(dtype_name)
    return [flux_arch.build_transformer("dev", seed=seed, dtype=dtype, device=device,
                                       scale=TINY if tiny else 1.0).eval().requires_grad_(False)
            for seed in (0, 10)]


def measure_flux(nets: list[Any], config: gpu.Config, *, device: str, steps: int,
                 default_steps: int, seconds_budget: float, tiny: bool) -> gpu.Measurement:
    """Time ``steps`` PGD steps of the flow contrast on two transformers (see the docstring)."""
    import torch

    from benchmarks import flux_arch

    result = gpu.Measurement(config=config)
    dtype = gpu._torch_dtype(config.dtype)
    side = 64 if tiny else flux_arch.NATIVE_SIDE
    for net in nets:
        (net.enable_gradient_checkpointing if config.checkpointing
         else net.disable_gradient_checkpointing)()
    torch.manual_seed(config.batch)
    inputs = flux_arch.packed_inputs(config.batch, side, dtype, device,
                                     scale=TINY if tiny else 1.0,
                                     text_tokens=8 if tiny else flux_arch.T5_TOKENS)
    x = inputs.pop("hidden_states").detach()
    target = torch.randn_like(x)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result.resident_bytes = int(torch.cuda.memory_allocated())
    marks = [time.perf_counter()]
    started = marks[0]
    try:
        for _ in range(steps):
            delta = x.clone().requires_grad_(True)
            ft, pre = (net(hidden_states=delta, **inputs).sample.float() for net in nets)
            loss = (ft - target).square().mean() - (pre - target).square().mean()
            (grad,) = torch.autograd.grad(loss, delta)
            float(grad.norm())  # syncs, as invert's loss read does
            marks.append(time.perf_counter())
            if marks[-1] - started > seconds_budget:
                result.status = "budget"
                break
    except torch.cuda.OutOfMemoryError:
        result.status, result.note = "OOM", "out of GPU memory"
    finally:
        result.seconds = time.perf_counter() - started
        if device.startswith("cuda"):
            result.peak_bytes = int(torch.cuda.max_memory_allocated())
    durations = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    timed = durations[gpu.WARMUP_STEPS:]
    result.step_seconds = durations
    if not timed:
        result.note = result.note or "too few steps inside the time budget"
        if result.status == "ok":
            result.status = "budget"
        return result
    result.steps_timed = len(timed)
    result.seconds_per_step = statistics.median(timed)
    result.overhead_seconds = None
    result.note = result.note or "transformer steps only (no VAE/T5)"
    result.images_per_hour = 3600.0 * config.batch / (default_steps * result.seconds_per_step)
    return result


def configurations(family: str, dtypes: list[str], batches: list[int]) -> list[gpu.Config]:
    return [gpu.Config(dtype, batch, channels_last=False, family=family,
                       checkpointing=checkpointing)
            for dtype in dtypes for checkpointing in (False, True) for batch in batches]


def run(args: Any) -> dict[str, Any]:
    import torch

    from cgidm_core.inversion import InversionConfig

    started = time.perf_counter()
    deadline = started + args.budget
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; use --dry-run to check the script on the CPU")
    default_steps = InversionConfig().steps
    facts: dict[str, Any] = {
        "date": gpu._dt.datetime.now(gpu._dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else
        "CPU (dry run, tiny models)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "device": device,
        "default_steps": default_steps, "steps_per_config": args.steps,
        "budget_seconds": args.budget, "dry_run": args.dry_run, "family": args.family,
        "model": ("tiny " if args.dry_run else "") + (
            "SDXL base 1.0 architecture at 1024 px" if args.family == "sdxl"
            else "two Flux.1-dev transformers at 1024 px (PGD step by hand)"),
    }
    results: list[gpu.Measurement] = []
    loaded: tuple[str, Any] | None = None
    for config in configurations(args.family, args.dtypes, args.batches):
        left = deadline - time.perf_counter()
        if left < args.min_config_seconds:
            results.append(gpu.Measurement(config=config, status="skipped",
                                           note="whole-run budget spent"))
            continue
        budget = max(args.min_config_seconds, min(args.config_seconds, left))
        try:
            if loaded is None or loaded[0] != config.dtype:
                loaded = model = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                built = time.perf_counter()
                if args.family == "sdxl":
                    model = build_sdxl_pair(config.dtype, device, args.dry_run)
                    facts.setdefault("weights_bytes", {})[config.dtype] = model.memory_bytes()
                else:
                    model = build_flux_transformers(config.dtype, device, args.dry_run)
                facts.setdefault("build_seconds", {})[config.dtype] = \
                    time.perf_counter() - built
                loaded = (config.dtype, model)
                del model
            model = loaded[1]
            if args.family == "sdxl":
                model.set_gradient_checkpointing("on" if config.checkpointing else "off")
                measurement = gpu.measure(model, config, device=device, steps=args.steps,
                                          default_steps=default_steps, seconds_budget=budget)
            else:
                measurement = measure_flux(model, config, device=device, steps=args.steps,
                                           default_steps=default_steps, seconds_budget=budget,
                                           tiny=args.dry_run)
            del model
        except Exception as exc:  # noqa: BLE001 - one broken configuration must not lose the rest
            loaded = None
            measurement = gpu.Measurement(config=config, status="error",
                                          note=f"{type(exc).__name__}: {exc}"[:300])
        results.append(measurement)
        print(f"{config.label}: {measurement.status} "
              f"{measurement.seconds_per_step or float('nan'):.3f} s/step {measurement.note}",
              file=sys.stderr, flush=True)
    facts["wall_seconds"] = time.perf_counter() - started
    return {"machine": facts, "results": [asdict(r) for r in results],
            "command": "python benchmarks/gpu.py " + " ".join(args.argv)}


def render(report: dict[str, Any]) -> str:
    facts = report["machine"]
    lines = [
        f"### {facts['gpu']}, {facts['date']}: {facts['model']}",
        "",
        f"torch {facts['torch']} (CUDA {facts['cuda']}), random weights, images per hour at the "
        f"default {facts['default_steps']} steps. Command: `{report['command'].strip()}`",
        "",
        "| dtype | gradient checkpointing | batch | s / PGD step | resident (GiB) | peak memory "
        "(GiB) | images / hour | status |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in report["results"]:
        c = r["config"]
        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30
        resident = None if r["resident_bytes"] is None else r["resident_bytes"] / 2**30
        status = r["status"] + (f" ({r['note']})" if r["note"] else "")
        lines.append(f"| {c['dtype']} | {'on' if c['checkpointing'] else 'off'} | {c['batch']} "
                     f"| {fmt(r['seconds_per_step'], '.3f')} | {fmt(resident, '.2f')} | "
                     f"{fmt(peak, '.1f')} | {fmt(r['images_per_hour'], ',.0f')} | {status} |")
    return "\n".join(lines)
