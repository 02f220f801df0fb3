"""Benchmark and soak harnesses (``python -m benchmarks.<name>``)."""
