"""Benchmark suite: shared harness (harness.py), per-op scripts, training step, scaling, report."""
