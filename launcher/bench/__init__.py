"""Throughput benchmarks: the matrix of setups, running them beside the plain Trainer, the probe, the report."""
