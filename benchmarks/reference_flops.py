#!/usr/bin/env python
"""Floating-point operations of one reference PGD step at SD 1.5 scale, counted, not timed.

The reference loop (``cgidm_testkit/reference_layout.py``) was corrected on 2026-11-30: it had
backpropagated through the VAE encoder at every step, which the authors' loop does not. The GPU
figures of docs/PERFORMANCE.md were measured before that and no GPU was available after it, so
this script says how much work per step the correction removes, with the real SD 1.5 UNet and VAE
architectures on PyTorch's meta device (no weights, no arithmetic: it runs in seconds anywhere).

A reference step is, per image: the fine-tuned and the pretrained UNet, each forward and
backward with weight gradients (nothing is frozen there), plus, in the old loop only, the VAE
encoder's backward at 512 px (its forward ran once, before the loop). The text encoders' backward
(77 tokens) is left out of both: it is under 1 % of a step. FLOPs are not seconds: on a GPU the
step time also depends on kernel launches and memory traffic, so the ratio is an estimate of the
change, not a measurement of it.

    python -m benchmarks.reference_flops
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def count() -> dict[str, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cgidm_testkit.full_size import sd15

    unet = sd15.build_unet(0, device="meta")
    vae = sd15.build_vae(1, device="meta")
    image = torch.randn(1, 3, 512, 512, device="meta", requires_grad=True)
    latent = torch.randn(1, 4, 64, 64, device="meta", requires_grad=True)
    context = torch.randn(1, 77, 768, device="meta")

    def flops(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    encoder_forward = flops(lambda: vae.encode(image).latent_dist.mean)
    encoder_both = flops(lambda: vae.encode(image).latent_dist.mean.sum().backward())
    unet_both = flops(
        lambda: unet(latent, 500, encoder_hidden_states=context).sample.sum().backward()
    )
    new = 2 * unet_both
    old = new + (encoder_both - encoder_forward)
    return {"vae_encoder_forward": encoder_forward, "vae_encoder_backward":
            encoder_both - encoder_forward, "unet_forward_backward": unet_both,
            "reference_step_old": old, "reference_step_new": new, "new_over_old": new / old}


def main() -> int:
    figures = count()
    tera = {k: v / 1e12 for k, v in figures.items() if k != "new_over_old"}
    print("| per image, SD 1.5 at 512 px | TFLOP |")
    print("|---|---|")
    for key, value in tera.items():
        print(f"| {key.replace('_', ' ')} | {value:.2f} |")
    print(f"\ncorrected reference step / old reference step: {figures['new_over_old']:.3f} "
          "of the FLOPs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
