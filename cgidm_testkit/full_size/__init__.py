"""The released SD 1.5, SDXL and Flux.1 architectures with random weights (or on the meta
device): real network sizes for the memory and GPU benchmarks, on machines that fetch nothing."""
