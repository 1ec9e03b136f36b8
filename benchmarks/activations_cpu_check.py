#!/usr/bin/env python
"""The meta-device activation count against memory really held, on a CPU, for small configs.

No GPU was lent, so the counts behind the registry's memory models (``benchmarks/activations.py``)
could not be checked on CUDA. This is the check a CPU allows: each family's transformer at a
reduced width and depth (same block types, same token counts at the given side), built with
random weights in float32, one forward pass with the input requiring grad; the resident memory
(VmRSS) the process gains and keeps while the autograd graph is alive, against what the meta
count predicts for the same config. On a CPU PyTorch's attention is its flash kernel for CPU,
which, like the GPU kernels the count assumes, keeps q, k, v, the output and the log-sum-exp.

The ratio includes the output tensor, allocator slack and anything torch keeps besides the saved
tensors; it cannot show GPU-only effects (cuBLAS workspaces, the caching allocator's blocks).

    python -m benchmarks.activations_cpu_check [--side 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys

#: Reduced configs: same block types as the released transformers, small widths and depths.
SMALL = {
    "qwen-image": {"num_layers": 4, "attention_head_dim": 64, "num_attention_heads": 4,
                   "joint_attention_dim": 256, "axes_dims_rope": (8, 28, 28)},
    "z-image": {"dim": 256, "n_layers": 4, "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 4,
                "cap_feat_dim": 2560, "axes_dims": [16, 24, 24]},
    "sd3": {"num_layers": 4, "num_attention_heads": 4, "caption_projection_dim": 256},
    "flux2": {"num_layers": 2, "num_single_layers": 4, "num_attention_heads": 4,
              "attention_head_dim": 64, "axes_dims_rope": (16, 16, 16, 16)},
}


#: glibc keeps freed heap pages resident unless large blocks are mmapped: with a low, fixed mmap
#: threshold every tensor buffer is its own mapping, returned on free, so RSS follows what is
#: alive rather than the high-water mark of the temporaries.
_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _one(family: str, side: int) -> dict[str, float]:
    """In a fresh process: meta count, then the real forward's held memory."""
    import torch

    from benchmarks.activations import saved_bytes
    from cgidm_testkit.full_size import transformers

    base = transformers.SIZING_VARIANT[family]
    spec = dataclasses.replace(base, config={**base.config, **SMALL[family]})
    predicted = saved_bytes(spec.build(torch.float32, "meta"),
                            spec.call_inputs(side, torch.float32, "meta"))
    torch.manual_seed(0)
    model = spec.build(torch.float32, "cpu")
    inputs = spec.call_inputs(side, torch.float32, "cpu")
    gc.collect()
    before = _rss()
    out = model(**inputs)
    held = _rss() - before
    del out
    return {"family": family, "side": side, "predicted": predicted, "held": held,
            "ratio": held / predicted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_one(args.one, args.side)))
        return 0
    print("| family (small config) | side | predicted (meta count) MB | held on CPU MB | "
          "held / predicted |")
    print("|---|---|---|---|---|")
    for family in SMALL:
        done = subprocess.run([sys.executable, "-m", "benchmarks.activations_cpu_check",
                               "--one", family, "--side", str(args.side)], check=True,
                              capture_output=True, text=True, env=_ENV)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {family} | {row['side']} | {row['predicted'] / 1e6:.0f} | "
              f"{row['held'] / 1e6:.0f} | {row['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
