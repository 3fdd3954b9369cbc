"""Benchmarking: workloads, metrics and reports (the standardized MoE inference benchmark).

    from moeinfer.bench import load_sweep, run_sweep
    run_sweep(load_sweep("default"), "bench-results/")     # = `moeinfer bench`

Modules: workloads (named, versioned workloads; workloads.yaml), config (sweep axes and their
registries), workload_run (drivers that time every token), instrument (per-forward hooks), metrics
(S-MBU/S-MFU, memory, expert load), latency (TTFT/TPOT/goodput), energy (RAPL/NVML), hardware
(peaks, machine), results (schema-validated results.json), report, compare, runner. docs/benchmark.md
defines every metric. Nothing heavy is imported until used.
"""

from __future__ import annotations

from moeinfer._lazy import lazy_exports

__all__ = ["SweepConfig", "compare_files", "load_sweep", "read_results", "run_sweep", "write_report"]
_WHERE = {"SweepConfig": "config", "load_sweep": "config", "run_sweep": "runner", "read_results": "results",
          "write_report": "report", "compare_files": "compare"}


__getattr__ = lazy_exports(__name__, {name: f"moeinfer.bench.{module}" for name, module in _WHERE.items()})
