"""The one timing helper (STYLE.md, point 10), for benchmarks and the calibrations that measure a
machine (offload cost model, hardware profiles, peak figures).

`time_call(fn)`: 1. warm-up calls; 2. synchronise the device; 3. timed calls, each timed with CUDA
events on a GPU (optionally replaying `fn` captured in a CUDA graph, which removes launch overhead
for tiny kernels) or with `clock` elsewhere; 4. the median (or best) of the timed calls, stopping
early once `budget_s` is spent (after at least 3 calls). Tests never call it: they do not time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], *, device: torch.device | str = "cpu", warmup: int = 1, reps: int = 5,
              stat: str = "median", cuda_graph: bool = False, budget_s: float | None = None,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one call of `fn` (steps in the module docstring); `stat` is "median" or "min"."""
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    device = torch.device(device)
    # 1-2.
    for _ in range(warmup):
        fn()
    synchronize(device)
    call = fn
    if cuda_graph and device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        call = graph.replay
    # 3.
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            call()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = clock()
            call()
            times.append(clock() - t0)
        if budget_s is not None and len(times) >= 3 and time.perf_counter() - start > budget_s:
            break
    # 4.
    return statistics.median(times) if stat == "median" else min(times)
