"""Benchmarks against peers (run with `make bench`; not part of the test suite)."""
