"""``benchmarks/gpu.py --family sdxl|flux``: images per hour and peak memory of the big families.

SDXL: the real SDXL base 1.0 architecture (``cgidm_testkit/full_size/sdxl.py``) with random
weights, built on the GPU (no download), as a ``StableDiffusionXLPair`` of a DreamBooth fine-tune
(two UNets, float32 VAE, both text encoders released after the prompt), timed through cgidm's own
``inversion.invert`` at the native 1024 px, for float16 and bfloat16, each batch size, with
gradient checkpointing off and on. Same timing rules as SD (``gpu_measure.measure``).

Flux: the FLUX.1-dev architecture (``cgidm_testkit/full_size/flux.py``) with random weights,
built on the GPU in bfloat16 (no download), as a ``FluxPair`` of a DreamBooth fine-tune exactly as
``load_pair`` holds one: two 12 B-parameter transformers, the 16-channel VAE in float32, T5-XXL
(4.7 B) and CLIP-L encoding the prompt once (512 T5 tokens; its time and peak memory are in
the report's machine facts) and then released. Timed through the same ``inversion.invert`` as
SDXL at the native 1024 px (a 16x128x128 latent, 4096 packed tokens), each batch size, with
gradient checkpointing off and on; an out-of-memory configuration is recorded as OOM and the
run goes on. Per-step time, the per-batch overhead (VAE encode and decodes) and images per hour
come out as for SD and SDXL.

``--dry-run`` runs both at a tiny scale on the CPU (seconds), as a test does.
"""

from __future__ import annotations

import datetime as _dt
import gc
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import gpu_measure

ROOT = Path(__file__).resolve().parents[1]

TINY = 0.1


def build_sdxl_pair(dtype_name: str, device: str, tiny: bool) -> Any:
    """A DreamBooth-shaped SDXL pair in memory: full size on the GPU, or tiny for --dry-run."""
    import torch

    from cgidm_core.models.sdxl import SDXLTextEncoders, StableDiffusionXLPair
    from cgidm_testkit.full_size import sd15, sdxl

    dtype = gpu_measure._torch_dtype(dtype_name)
    scale = TINY if tiny else 1.0
    tokenizer = sd15.build_tokenizer()

    def ready(module: Any, module_dtype: torch.dtype) -> Any:
        module = module.to(device=device)
        if next(module.parameters()).dtype != module_dtype:
            module = module.to(dtype=module_dtype)
        return module.eval().requires_grad_(False)

    encoders = ready(SDXLTextEncoders(*sdxl.build_text_encoders(
        tokenizer, device=device, scale=scale)), dtype)
    pair = StableDiffusionXLPair(
        vae=ready(sdxl.build_vae(1, device=device, scale=scale), torch.float32),
        tokenizer=tokenizer, tokenizer_2=tokenizer,
        alphas_cumprod=sd15.build_scheduler().alphas_cumprod,
        unet_pretrained=ready(sdxl.build_unet(0, device=device, scale=scale), dtype),
        unet_finetuned=ready(sdxl.build_unet(10, device=device, scale=scale), dtype),
        text_encoder_pretrained=encoders, text_encoder_finetuned=encoders,
        device=torch.device(device), dtype=dtype, finetuned_kind="dreambooth",
        default_prompt=gpu_measure.PROMPT,
    )
    pair.conditioning(gpu_measure.PROMPT)
    pair.release_text_encoders()
    return pair


def build_flux_pair(dtype_name: str, device: str, tiny: bool) -> Any:
    """A FLUX.1-dev pair of a DreamBooth fine-tune in memory, as ``load_pair`` builds one from
    folders: two random transformers (12 B parameters each at full size) in ``dtype``, the
    16-channel VAE in float32, T5-XXL and CLIP-L in ``dtype`` with locally built tokenizers, the
    scheduler config of FLUX.1-dev (dynamic time shift), guidance 3.5. Full size on the GPU
    (about 58 GB of weights in bfloat16 until the prompt is encoded, 48 GB after), or tiny for
    --dry-run. The prompt is encoded (512 T5 tokens) and the text encoders released, as
    ``load_pair`` does by default; the seconds and peak memory of that are returned with it."""
    import torch

    from cgidm_core.models.flux import FluxPair, FluxTextEncoders
    from cgidm_testkit.full_size import flux, sd15

    dtype = gpu_measure._torch_dtype(dtype_name)
    scale = TINY if tiny else 1.0
    tokenizer = sd15.build_tokenizer()

    def ready(module: Any) -> Any:
        return module.to(device=device).eval().requires_grad_(False)

    encoders = ready(FluxTextEncoders(
        flux.build_clip(dtype, device, scale=scale, tokenizer=tokenizer),
        flux.build_t5(dtype, device, scale=scale)))
    pair = FluxPair(
        vae=ready(flux.build_vae(torch.float32, device, scale=scale)),
        tokenizer=tokenizer, tokenizer_2=flux.build_t5_tokenizer(),
        scheduler_config=flux.SCHEDULER_CONFIG, guidance=None,
        alphas_cumprod=None, prediction_type="flow",
        unet_pretrained=ready(flux.build_transformer("dev", 0, dtype, device, scale)),
        unet_finetuned=ready(flux.build_transformer("dev", 10, dtype, device, scale)),
        text_encoder_pretrained=encoders, text_encoder_finetuned=encoders,
        device=torch.device(device), dtype=dtype, finetuned_kind="dreambooth",
        default_prompt=gpu_measure.PROMPT,
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    pair.conditioning(gpu_measure.PROMPT)  # CLIP pooled + T5 hidden states, once per prompt
    gpu_measure._sync(device)
    encoding = {"encode_seconds": time.perf_counter() - started,
                "text_encoder_bytes": pair.release_text_encoders()}
    if device.startswith("cuda"):
        encoding["encode_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return pair, encoding


def configurations(family: str, dtypes: list[str], batches: list[int]) -> list[gpu_measure.Config]:
    return [gpu_measure.Config(dtype, batch, channels_last=False, family=family,
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
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else
        "CPU (dry run, tiny models)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "device": device,
        "default_steps": default_steps, "steps_per_config": args.steps,
        "budget_seconds": args.budget, "dry_run": args.dry_run, "family": args.family,
        "model": ("tiny " if args.dry_run else "") + (
            "SDXL base 1.0 architecture at 1024 px" if args.family == "sdxl"
            else "FLUX.1-dev architecture (FluxPair: two transformers, VAE, T5-XXL + CLIP-L "
            "released after encoding) at 1024 px"),
    }
    results: list[gpu_measure.Measurement] = []
    loaded: tuple[str, Any] | None = None
    for config in configurations(args.family, args.dtypes, args.batches):
        left = deadline - time.perf_counter()
        if left < args.min_config_seconds:
            results.append(gpu_measure.Measurement(config=config, status="skipped",
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
                else:
                    model, encoding = build_flux_pair(config.dtype, device, args.dry_run)
                    for key, value in encoding.items():
                        facts.setdefault(key, {})[config.dtype] = value
                facts.setdefault("weights_bytes", {})[config.dtype] = model.memory_bytes()
                facts["image_size"] = model.image_size
                facts.setdefault("build_seconds", {})[config.dtype] = \
                    time.perf_counter() - built
                loaded = (config.dtype, model)
                del model
            model = loaded[1]
            model.set_gradient_checkpointing("on" if config.checkpointing else "off")
            measurement = gpu_measure.measure(model, config, device=device, steps=args.steps,
                                      default_steps=default_steps, seconds_budget=budget)
            del model
        except torch.cuda.OutOfMemoryError:  # building the pair itself (the weights)
            loaded = None
            measurement = gpu_measure.Measurement(config=config, status="OOM",
                                          note="out of GPU memory while building the pair")
        except Exception as exc:  # noqa: BLE001 - one broken configuration must not lose the rest
            loaded = None
            measurement = gpu_measure.Measurement(config=config, status="error",
                                          note=f"{type(exc).__name__}: {exc}"[:300])
        results.append(measurement)
        print(f"{config.label}: {measurement.status} "
              f"{measurement.seconds_per_step or float('nan'):.3f} s/step {measurement.note}",
              file=sys.stderr, flush=True)
    facts["wall_seconds"] = time.perf_counter() - started
    return {"machine": facts, "results": [asdict(r) for r in results],
            "command": "python -m benchmarks.gpu " + " ".join(args.argv)}


def render(report: dict[str, Any]) -> str:
    facts = report["machine"]
    lines = [
        f"### {facts['gpu']}, {facts['date']}: {facts['model']}",
        "",
        f"torch {facts['torch']} (CUDA {facts['cuda']}), random weights, images per hour at the "
        f"default {facts['default_steps']} steps. Command: `{report['command'].strip()}`",
        "",
        *_encoding_lines(facts),
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


def _encoding_lines(facts: dict[str, Any]) -> list[str]:
    """Flux: what encoding the prompt once cost before the text encoders were released."""
    if "encode_seconds" not in facts:
        return []
    parts = []
    for dtype, seconds in facts["encode_seconds"].items():
        freed = facts.get("text_encoder_bytes", {}).get(dtype, 0) / 2**30
        peak = facts.get("encode_peak_bytes", {}).get(dtype)
        weights = facts.get("weights_bytes", {}).get(dtype, 0) / 2**30
        parts.append(f"{dtype}: prompt encoded (CLIP + T5, 512 tokens) in {seconds:.2f} s"
                     + (f", peak {peak / 2**30:.1f} GiB" if peak is not None else "")
                     + f", text encoders released ({freed:.2f} GiB), {weights:.2f} GiB of "
                     "weights left for the inversion")
    return ["; ".join(parts) + f". Image side {facts.get('image_size')} px.", ""]
