"""Part a: the environment, and the limits every later figure is divided by, measured in this run.

1. versions: GPU name and memory, driver, CUDA, torch, triton, transformers, the commit;
2. device-to-device copy bandwidth (moeinfer.bench.hardware.measure_bandwidth: bytes read + written);
3. pinned host-to-device bandwidth: one pinned host buffer copied to the device with
   `non_blocking=True`, timed by bench_moe.time_fn (CUDA events); the dry run's stand-in is an
   ordinary host buffer copied to the CPU "device";
4. dense bf16 matmul TFLOP/s (moeinfer.bench.hardware.measure_matmul);
5. the host's own copy bandwidth and fp32 matmul rate (the offload simulator's CPU-assist figures),
   and whether NVML's energy counter reads.
"""

from __future__ import annotations

import datetime
from typing import Any

from gpu_suite_parts.common import Context, Result, part


def _versions(ctx: Context) -> dict[str, Any]:
    import torch

    from moeinfer.bench.hardware import git_commit, hardware_info, software_info

    sw = software_info()
    for name in ("triton", "transformers"):
        try:
            sw[name] = __import__(name).__version__
        except ImportError:
            sw[name] = None
    sw["driver"] = None
    if ctx.device == "cuda":
        try:
            import pynvml

            pynvml.nvmlInit()
            sw["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as e:  # the driver version is informative only
            sw["driver"] = f"unknown ({type(e).__name__}: {e})"
    return dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                hardware=hardware_info(torch.device(ctx.device)), software=sw, commit=git_commit(ctx.repo))


def measure_h2d(device: Any, *, nbytes: int) -> float:
    """Host-to-device bytes/s from a pinned host buffer (step 3; an ordinary one on the CPU)."""
    import torch
    from bench_moe import time_fn

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda").fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / time_fn(lambda: dst.copy_(src, non_blocking=True), device, warmup=2, reps=10, budget_s=2.0)


def energy_probe(ctx: Context) -> dict[str, Any]:
    from moeinfer.bench.energy import default_meter

    meter = default_meter(ctx.device if ctx.device == "cuda" else "cpu")
    return dict(available=meter.available, counters=[c.name for c in meter.counters], why_not=meter.unavailable)


@part("env", letter="a", title="Environment and measured limits", share_s=20,
      markdown=lambda r: markdown(r))
def run(ctx: Context) -> Result:
    import torch

    from moeinfer.bench.hardware import measure_bandwidth, measure_matmul

    dev = ctx.torch_device()
    result: Result = dict(versions=_versions(ctx))
    ctx.save(result)
    small = ctx.dry_run
    limits = dict(
        copy_bytes_s=measure_bandwidth(dev, nbytes=(16 << 20) if small else (1 << 30)),
        h2d_bytes_s=measure_h2d(dev, nbytes=(16 << 20) if small else (1 << 30)),
        matmul_flops=measure_matmul(dev, torch.bfloat16, n=128 if small else 8192),
        cpu_copy_bytes_s=measure_bandwidth("cpu", nbytes=(16 << 20) if small else (512 << 20)),
        cpu_matmul_flops=measure_matmul("cpu", torch.float32, n=128 if small else 1024),
        cpu_threads=torch.get_num_threads(),
    )
    result.update(limits=limits, energy=energy_probe(ctx))
    return result


def markdown(r: Result) -> str:
    v = r.get("versions", {})
    sw, hw = v.get("software", {}), v.get("hardware", {})
    gpu = hw.get("gpu") or {}
    lines = [f"Device: {gpu.get('name', hw.get('device', '?'))}, "
             f"{(gpu.get('memory_bytes') or 0) / 2**30:.0f} GiB; driver {sw.get('driver')}, CUDA {sw.get('cuda')}, "
             f"torch {sw.get('torch')}, triton {sw.get('triton')}, transformers {sw.get('transformers')}; "
             f"commit {v.get('commit')}; {v.get('date')}.", ""]
    lim = r.get("limits")
    if lim:
        lines += ["| limit | measured |", "|---|---:|",
                  f"| device-to-device copy | {lim['copy_bytes_s'] / 1e9:.1f} GB/s |",
                  f"| pinned host-to-device copy | {lim['h2d_bytes_s'] / 1e9:.1f} GB/s |",
                  f"| dense bf16 matmul | {lim['matmul_flops'] / 1e12:.1f} TFLOP/s |",
                  f"| host copy | {lim['cpu_copy_bytes_s'] / 1e9:.1f} GB/s |",
                  f"| host fp32 matmul ({lim['cpu_threads']} threads) | {lim['cpu_matmul_flops'] / 1e9:.0f} GFLOP/s |"]
    e = r.get("energy")
    if e:
        lines += ["", f"Energy counters: {', '.join(e['counters']) or 'none'}"
                  + (f" ({e['why_not']})" if e.get("why_not") else "")]
    return "\n".join(lines)
