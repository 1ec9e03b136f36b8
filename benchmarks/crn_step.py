#!/usr/bin/env python
"""Time of one PGD step with common random numbers: one shared noisy latent against two.

Before 2026-11-30 ``contrast_loss`` decided whether both models share one noisy latent with
``noise_pre is noise_ft`` after moving both noises to the pair's device. On a CPU ``.to`` returns
the same tensor and sharing held; on a GPU two ``.to(device)`` calls give two tensors, so with
common random numbers the noise was copied to the device twice and the noisy latent built twice
(two graph branches, both backpropagated). Sharing is now decided before the move.

This script measures what that costs, on whatever device it is given: the forward and backward
of one contrast-loss step (both UNets, the gradient w.r.t. the latent) with the noisy latent
built once (``noise_pre=None``, what the inversion does now) and twice (an equal copy of the
noise, what the old code did on a GPU). The two variants alternate step by step so that a load
change on a shared machine hits both alike; the medians and their ratio are printed.

    python -m benchmarks.crn_step                        # tiny SD pair (16x16 latent), CPU
    python -m benchmarks.crn_step --sample-size 32 --batch 4 --steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import machine

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample-size", type=int, default=16, help="latent side of the tiny SD")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    import torch

    from cgidm_core.inversion import contrast_loss
    from cgidm_core.models import load_pair_from_paths
    from cgidm_testkit import tinymodels

    machine.set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cgidm-crn-") as tmp:
        base = tinymodels.make_tiny_sd(Path(tmp) / "base", sample_size=args.sample_size)
        finetuned = tinymodels.make_dreambooth_folder(base, Path(tmp) / "ft")
        pair = load_pair_from_paths(base, finetuned, device=args.device)
    cond = pair.conditioning("sks style")
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, *pair.latent_shape)
    z = torch.randn(shape, generator=gen).to(pair.device)

    def step(shared: bool) -> float:
        t = torch.randint(1, 1000, (args.batch,), generator=gen)
        noise = torch.randn(shape, generator=gen)
        delta = torch.zeros_like(z, requires_grad=True)
        if pair.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        noise_pre = None if shared else noise.clone()  # equal values, a second noisy latent
        loss = contrast_loss(pair, z + delta, cond, t, noise, noise_pre, 1)
        (grad,) = torch.autograd.grad(loss.sum(), delta)
        grad.sum().item()  # waits for the device
        return time.perf_counter() - start

    for _ in range(3):  # warm-up
        step(True), step(False)
    load_before = machine.load_average()
    times: dict[str, list[float]] = {"one noisy latent (now)": [], "two noisy latents (before)": []}
    for _ in range(args.steps):
        times["one noisy latent (now)"].append(step(True))
        times["two noisy latents (before)"].append(step(False))
    load_after = machine.load_average()

    medians = {k: statistics.median(v) for k, v in times.items()}
    now, before = medians.values()
    print(f"tiny SD pair, latent {pair.latent_shape}, batch {args.batch}, device "
          f"{pair.device}, {args.threads} torch thread(s), {args.steps} alternating steps each; "
          f"1-min load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print()
    print("| variant | median s / step | min s / step |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.4f} | {min(values):.4f} |")
    print()
    print(f"before / now: {before / now:.3f}x the time per step")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "latent_shape": list(pair.latent_shape), "batch": args.batch,
            "device": str(pair.device), "threads": args.threads, "steps": args.steps,
            "seconds": times, "median": medians, "ratio_before_over_now": before / now,
            "load_average": [load_before, load_after], "machine": machine.machine_facts(),
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
