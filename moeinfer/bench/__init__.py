"""Benchmarking: workloads, metrics and reports (the standardized MoE inference benchmark)."""
