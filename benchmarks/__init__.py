"""Benchmarks: measured on the real path, baselines in the same run; results go to docs/benchmarks/."""
