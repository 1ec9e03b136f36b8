"""What the base model's own recovery (``InversionConfig.base_recovery``) costs: the time of
``authenticate`` on the demo pair with it off and on, same images and settings, and the base
recovery's similarity next to the contrast recovery's (members should differ more).

    python -m benchmarks.base_recovery_cost [--images 4] [--steps 100] [--repeats 2]

Prints a table; numbers depend on the machine (the README says which one gave them).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from cgidm_core import InversionConfig, authenticate, load_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/wikiart-vangogh"))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    pair = load_pair("demo-base", "demo-vangogh", device="cpu")
    members = sorted((args.data / "membership").glob("*.jpg"))[: args.images]
    controls = sorted((args.data / "hold_out").glob("*.jpg"))[: args.images]
    config = InversionConfig(steps=args.steps)
    timings: dict[bool, list[float]] = {False: [], True: []}
    last = {}
    for _ in range(args.repeats):
        for on in (False, True):
            started = time.perf_counter()
            last[on] = authenticate(pair, members + controls,
                                    config=replace(config, base_recovery=on))
            timings[on].append(time.perf_counter() - started)
    off, on = statistics.median(timings[False]), statistics.median(timings[True])
    n = len(members) + len(controls)
    print(f"demo-base / demo-vangogh, {n} images, {args.steps} steps, CPU "
          f"({torch.get_num_threads()} threads), median of {args.repeats}")
    print(f"{'base recovery':<15} {'seconds':>8} {'per image':>10}")
    print(f"{'off':<15} {off:>8.2f} {off / n:>10.3f}")
    print(f"{'on':<15} {on:>8.2f} {on / n:>10.3f}")
    print(f"extra: {on - off:.2f} s ({100 * (on - off) / off:.0f} %)")
    assert [r.score for r in last[False]] == [r.score for r in last[True]], "scores changed"
    print("\nscores identical with and without it\n")
    print(f"{'image':<28} {'role':<8} {'ssim suspect':>12} {'ssim base':>10}")
    for i, r in enumerate(last[True]):
        role = "member" if i < len(members) else "hold-out"
        print(f"{r.name[:28]:<28} {role:<8} {r.metrics['ssim']:>12.3f} "
              f"{r.extra['base_recovery']['ssim']:>10.3f}")


if __name__ == "__main__":
    main()
