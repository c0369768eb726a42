"""The benchmark of issue 13: `python -m bench` (see bench/run.py and docs/benchmarks.md)."""
