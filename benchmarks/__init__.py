"""Benchmarks and capacity planning: `sferp bench` (bench.py) and `sferp plan` (plan.py)."""
