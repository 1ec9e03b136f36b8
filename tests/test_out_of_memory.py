"""GPU out-of-memory raised inside a batch (an exception, not a kill): the batch is halved and
the job goes on. CPU-only: the error is injected around the real inversion."""

from __future__ import annotations

import pytest
import torch

import cgidm_core.api
from cgidm_core import InversionConfig, authenticate, load_pair
from cgidm_core.errors import OutOfMemory
from cgidm_testkit.processes import png_bytes

CONFIG = dict(steps=2, seed=3)


def _oom_above(monkeypatch, limit: int) -> list[int]:
    """Make every inversion of more than ``limit`` images raise CUDA's out-of-memory error;
    returns the batch sizes the library tried, in order."""
    real = cgidm_core.api.invert
    tried: list[int] = []

    def invert(pair, tensor, *args, **kwargs):
        tried.append(tensor.shape[0])
        if tensor.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(pair, tensor, *args, **kwargs)

    monkeypatch.setattr(cgidm_core.api, "invert", invert)
    return tried


def test_out_of_memory_halves_the_batch_and_gives_the_same_results(tiny_ddpm_pair,
                                                                    monkeypatch):
    pair = load_pair(*map(str, tiny_ddpm_pair), device="cpu")
    images = [png_bytes(seed) for seed in range(5)]
    reference = authenticate(pair, images, config=InversionConfig(**CONFIG), batch_size=2)

    tried = _oom_above(monkeypatch, 2)
    halved: list[int] = []
    progress: list[tuple[int, int]] = []
    results = authenticate(pair, images, config=InversionConfig(**CONFIG), batch_size=5,
                           on_batch_halved=halved.append,
                           progress=lambda done, total: progress.append((done, total)))
    assert tried == [5, 2, 2, 1]  # 5 did not fit; then 2 + 2 + 1
    assert halved == [2]
    assert [r.name for r in results] == [r.name for r in reference]
    for got, want in zip(results, reference, strict=True):
        assert got.score == pytest.approx(want.score, abs=1e-6)  # per-image seeds
    assert progress[-1][0] == progress[-1][1] == 3 * CONFIG["steps"]


def test_one_image_that_does_not_fit_is_a_clear_error(tiny_ddpm_pair, monkeypatch):
    pair = load_pair(*map(str, tiny_ddpm_pair), device="cpu")
    _oom_above(monkeypatch, 0)
    with pytest.raises(OutOfMemory, match="batch size 1"):
        authenticate(pair, [png_bytes(1), png_bytes(2)], config=InversionConfig(**CONFIG),
                     batch_size=2)


def test_one_image_is_retried_with_gradient_checkpointing_under_auto(tiny_ddpm_pair,
                                                                     monkeypatch):
    """The estimate said one image fits without checkpointing, the device disagreed: under
    "auto" the image runs again with it on (same scores); "off" keeps the clear error."""
    pair = load_pair(*map(str, tiny_ddpm_pair), device="cpu")
    images = [png_bytes(1), png_bytes(2)]
    reference = authenticate(pair, images, config=InversionConfig(**CONFIG), batch_size=1)
    real = cgidm_core.api.invert
    tried: list[bool] = []

    def invert(pair, tensor, *args, **kwargs):
        tried.append(pair.gradient_checkpointing)
        if not pair.gradient_checkpointing:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(pair, tensor, *args, **kwargs)

    monkeypatch.setattr(cgidm_core.api, "invert", invert)
    results = authenticate(pair, images, config=InversionConfig(**CONFIG), batch_size=1)
    assert tried == [False, True, True]  # the first image retried, the second already on
    assert pair.gradient_checkpointing and all(u.is_gradient_checkpointing
                                               for u in pair.denoisers())
    for got, want in zip(results, reference, strict=True):
        assert got.score == pytest.approx(want.score, abs=1e-6)
    with pytest.raises(OutOfMemory, match="batch size 1"):
        authenticate(pair, images, batch_size=1,
                     config=InversionConfig(**CONFIG, gradient_checkpointing="off"))
