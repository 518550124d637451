"""Benchmark scripts: run as ``python -m evaluation.benchmarks.<name>`` from the repo root."""
