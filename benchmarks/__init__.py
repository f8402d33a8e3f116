"""Measurement commands (not tests): ``python -m benchmarks.<name>``; results land in benchmarks/RESULTS.md."""
