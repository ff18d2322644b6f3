"""Benchmarks of udat-kernels against the eager reference and other loss libraries."""
