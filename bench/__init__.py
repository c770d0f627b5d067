"""Benchmarks of the SAKE toolkit (editing throughput at full model scale)."""
