"""What the tests and the benchmarks both build: models, real service stacks, reference layouts.

One importable home for the helpers the two share, so neither reaches into the other: tiny random
pipelines (:mod:`.tinymodels`), the real processes of a service stack (:mod:`.processes`,
:mod:`.routing_stack`, :mod:`.worker_loss`), the full-size SD 1.5 / SDXL / Flux architectures
with random weights (:mod:`.full_size`) and the authors' layout re-created for measurement
(:mod:`.reference_layout`). It lives beside ``tests/`` and ``benchmarks/`` in the repository and
is not part of the wheel or the images: pytest and ``python -m benchmarks.NAME`` find it from the
repository root.
"""
