"""The machine a benchmark ran on: hardware, software, and its measured and datasheet peaks.

Utilisation figures (S-MBU, S-MFU) are stated against two peaks, following style rule 10 and
MoE-CAP (Jiang et al., 2024):
1. measured in the same run: memory bandwidth from a large tensor copy (bytes read + written over
   the best of a few repetitions) and compute from a dense square matmul in the run's dtype
   (2 n^3 FLOPs over the best time);
2. datasheet: the vendor's number where the device is known (DATASHEET below); there is none for a
   generic CPU, and the report says so.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from moeinfer import __version__
from moeinfer.cpuinfo import cpu_name
from moeinfer.timing import time_call

# Vendor datasheet peaks: memory bandwidth (bytes/s) and dense (no sparsity) FLOP/s per dtype.
DATASHEET: dict[str, dict[str, Any]] = {
    "H100 SXM": dict(match=("H100", "HBM3"), bandwidth=3.35e12,
                     flops={"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
                     source="NVIDIA H100 Tensor Core GPU datasheet (SXM5)"),
    "H100 PCIe": dict(match=("H100", "PCIe"), bandwidth=2.0e12,
                      flops={"bfloat16": 756e12, "float16": 756e12, "float32": 51e12},
                      source="NVIDIA H100 Tensor Core GPU datasheet (PCIe)"),
    "H200": dict(match=("H200",), bandwidth=4.8e12,
                 flops={"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
                 source="NVIDIA H200 Tensor Core GPU datasheet (SXM)"),
    "A100 80GB": dict(match=("A100", "80GB"), bandwidth=2.039e12,
                      flops={"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
                      source="NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB)"),
    "A100 40GB": dict(match=("A100",), bandwidth=1.555e12,
                      flops={"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
                      source="NVIDIA A100 Tensor Core GPU datasheet (40GB)"),
    "L40S": dict(match=("L40S",), bandwidth=864e9,
                 flops={"bfloat16": 362e12, "float16": 362e12, "float32": 91.6e12},
                 source="NVIDIA L40S datasheet"),
}


def datasheet_peak(device_name: str | None) -> dict[str, Any] | None:
    """The datasheet entry whose match words all occur in the device's name, else None."""
    if not device_name:
        return None
    for name, entry in DATASHEET.items():
        if all(w.lower() in device_name.lower() for w in entry["match"]):
            return dict(name=name, bandwidth_bytes_s=entry["bandwidth"], flops=entry["flops"], source=entry["source"])
    return None


def measure_bandwidth(device: torch.device | str = "cpu", *, nbytes: int | None = None, reps: int = 5) -> float:
    """Copy bandwidth in bytes/s: 2 * nbytes (read + write) / best copy time."""
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 128 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device=device, reps=reps, stat="min")
    return 2 * src.numel() * 4 / t


def measure_matmul(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                   n: int | None = None, reps: int = 3) -> float:
    """Dense matmul throughput in FLOP/s: 2 n^3 / best time of an [n, n] @ [n, n] product."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else (1024 if dtype == torch.float32 else 512))
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_call(lambda: a @ b, device=device, reps=reps, stat="min")
    return 2 * n**3 / t


def hardware_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """CPU model and cores, memory, GPU name and memory when present."""
    device = torch.device(device)
    info: dict[str, Any] = dict(cpu=cpu_name(), cpu_cores=os.cpu_count(),
                                cpu_threads_used=torch.get_num_threads(), device=str(device), gpu=None)
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_bytes"] = pages * size
    except (ValueError, OSError):
        info["memory_bytes"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = dict(name=props.name, memory_bytes=props.total_memory,
                           capability=f"{props.major}.{props.minor}", count=torch.cuda.device_count())
    return info


def measure_peaks(device: torch.device | str, dtypes: list[str]) -> dict[str, Any]:
    """Measured peaks (step 1) and the datasheet's (step 2) for `device` and each compute dtype."""
    device = torch.device(device)
    measured = dict(bandwidth_bytes_s=measure_bandwidth(device),
                    flops={d: measure_matmul(device, getattr(torch, d)) for d in dtypes},
                    method="copy of 128 MiB (1 GiB on GPU), best of 5; square matmul n=1024 fp32 / 512 "
                           "half on CPU, 8192 on GPU, best of 3")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    sheet = datasheet_peak(name)
    note = None if sheet else ("no datasheet peak for a generic CPU" if device.type == "cpu"
                               else f"no datasheet entry for {name!r}")
    return dict(measured=measured, datasheet=sheet, datasheet_note=note)


def git_commit(repo: str | Path | None = None) -> str | None:
    repo = Path(repo) if repo else Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def software_info() -> dict[str, Any]:
    import numpy

    return dict(moeinfer=__version__, python=platform.python_version(), torch=torch.__version__,
                numpy=numpy.__version__, cuda=torch.version.cuda, platform=platform.platform())
