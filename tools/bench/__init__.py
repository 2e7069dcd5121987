"""Benchmarks: each writes the JSON (and plot) published under ``docs/benchmarks/``."""
