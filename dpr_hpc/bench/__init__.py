"""Benchmarks apart from the product: the stage benchmark, the control path, scale and the GPU check."""
