"""Benchmarks: `python -m bench.run [--quick]` writes BENCHMARKS.md (see `make bench`)."""
