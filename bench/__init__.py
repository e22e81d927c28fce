"""Benchmarks (`make bench`): results land in docs/benchmarks.md with PNG plots."""
