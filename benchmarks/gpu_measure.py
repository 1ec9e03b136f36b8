"""The measurement every GPU benchmark shares: one configuration, one timed ``invert`` run.

``benchmarks/gpu.py`` (SD 1.5, the reference layout, the command line) and
``benchmarks/gpu_families.py`` (SDXL, Flux) both time configurations the same way. The common part
lives here so that the two import it and not each other: ``gpu`` dispatches ``--family`` to
``gpu_families``, and ``gpu_families`` needs only this module.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

PROMPT = "sks style"
WARMUP_STEPS = 2


@dataclass
class Config:
    dtype: str
    batch: int
    channels_last: bool = True
    compile: bool = False
    layout: str = "cgidm"  # "cgidm" or "reference" (the authors' layout, one image at a time)
    family: str = "sd15"  # sd15 | sdxl | flux (benchmarks/gpu_families.py)
    checkpointing: bool = False  # gradient checkpointing of the denoisers

    @property
    def label(self) -> str:
        parts = [] if self.family == "sd15" else [self.family]
        parts += ["reference layout"] if self.layout == "reference" else []
        parts += [self.dtype, f"batch {self.batch}"]
        parts.append("channels-last" if self.channels_last else "contiguous")
        if self.compile:
            parts.append("torch.compile")
        if self.checkpointing:
            parts.append("gradient checkpointing")
        return ", ".join(parts)


@dataclass
class Measurement:
    config: Config
    status: str = "ok"  # ok | budget (stopped early, figures from the steps done) | skipped | OOM
    steps_timed: int = 0
    seconds_per_step: float | None = None
    overhead_seconds: float | None = None
    peak_bytes: int | None = None
    resident_bytes: int | None = None  # allocated before the run: weights, caches, buffers
    images_per_hour: float | None = None
    seconds: float = 0.0
    note: str = ""
    step_seconds: list[float] = field(default_factory=list)


def _torch_dtype(name: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


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
        result.resident_bytes = int(torch.cuda.memory_allocated())
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
