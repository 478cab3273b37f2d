"""Benchmark harness and performance-regression suite of kcm_cuda (see benchmarks/README.md)."""
