"""Hardware profiles and model shapes for the offload simulator: data, not code.

A `HardwareProfile` gives the rates the simulator's clock needs: the slow->fast link (GB/s and a
per-transfer latency), the fast tier's memory bandwidth and compute rate (an expert or a layer costs
max(bytes / bandwidth, flops / rate): batch-1 decode is bound by bandwidth), and the CPU's memory
bandwidth and compute rate (CPU-assisted experts). Shipped profiles are JSON files in
`moeinfer/offload/profiles/`; `calibrate()` measures the machine at hand (fast tier = RAM, slow tier =
disk) and can write one. A `ModelShape` gives the bytes and flops of an expert and of the rest of a layer.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeinfer.arch import parse_config
from moeinfer.fsutil import atomic_write_text
from moeinfer.loading.checkpoint import parse_dtype, read_config
from moeinfer.model.shape import SHAPES as MODEL_SHAPES
from moeinfer.model.shape import ModelShape
from moeinfer.model.transformer import MoEModel
from moeinfer.models import resolve_model_path
from moeinfer.timing import time_call

PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    link_gbps: float
    fast_mem_gbps: float
    compute_tflops: float
    link_latency_us: float = 0.0
    cpu_mem_gbps: float = 20.0
    cpu_gflops: float = 50.0
    # Host time of one offloaded layer visit outside transfers and kernels (routing read back, cache
    # bookkeeping, launching per-expert work): measured from a live run, 0 = not charged.
    host_us_per_layer: float = 0.0
    # The same two for a step holding prompt rows (its visits book many rows; its loads land while its
    # experts compute), measured apart by `moeinfer plan`'s profile; None = as a decode step's.
    prompt_host_us_per_layer: float | None = None
    prompt_link_latency_us: float | None = None
    description: str = ""
    measured: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in ("link_gbps", "fast_mem_gbps", "compute_tflops", "cpu_mem_gbps", "cpu_gflops"):
            if not getattr(self, f) > 0:
                raise ValueError(f"hardware profile {self.name!r}: {f} must be > 0, got {getattr(self, f)}")
        for f in ("host_us_per_layer", "prompt_host_us_per_layer", "prompt_link_latency_us"):
            v = getattr(self, f)
            if v is not None and not v >= 0:
                raise ValueError(f"hardware profile {self.name!r}: {f} must be >= 0, got {v}")

    def host_s(self, prompt: bool) -> float:
        """Seconds of host time an offloaded layer visit pays (of a step holding prompt rows or not)."""
        us = self.prompt_host_us_per_layer if prompt and self.prompt_host_us_per_layer is not None else None
        return 1e-6 * (self.host_us_per_layer if us is None else us)

    def latency_s(self, prompt: bool) -> float:
        """Seconds a load pays beyond its bytes over the link (of a step holding prompt rows or not)."""
        us = self.prompt_link_latency_us if prompt and self.prompt_link_latency_us is not None else None
        return 1e-6 * (self.link_latency_us if us is None else us)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str | os.PathLike[str]) -> HardwareProfile:
    """A shipped profile by name, or a JSON file."""
    p = Path(name_or_path)
    if not p.is_file():
        p = PROFILE_DIR / f"{name_or_path}.json"
    if not p.is_file():
        raise ValueError(f"hardware profile {str(name_or_path)!r} is neither a JSON file nor a shipped profile "
                         f"({', '.join(profile_names())}); `moeinfer simulate --calibrate` measures this machine")
    try:
        data = json.loads(p.read_text())
        return HardwareProfile(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"hardware profile {p} is malformed: {e}") from e


# The shapes the offload simulator can charge: those whose dense parameters are known too.
SHAPES: dict[str, ModelShape] = {n: s for n, s in MODEL_SHAPES.items() if s.dense_params_per_layer}


def shape_from_checkpoint(path: str | os.PathLike[str]) -> ModelShape:
    """The shape of a checkpoint folder (or shipped model name) from its config.json; no weights read."""
    root = resolve_model_path(path)
    hf = read_config(root)
    dtype = parse_dtype(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16") or torch.bfloat16
    with torch.device("meta"):
        model = MoEModel(parse_config(hf)).to(dtype)  # sizes in the checkpoint's dtype
    return ModelShape.from_model(model, name=root.name)


def calibrate(*, scratch_dir: str | os.PathLike[str] | None = None, mib: int = 128, repeats: int = 5) -> HardwareProfile:
    """Measure this machine: fast tier = RAM, slow tier = disk (cold reads: pages dropped after writing).

    1. link: write `mib` MiB to a scratch file, fsync, drop its pages, time a read (median of repeats,
       pages dropped before each);
    2. fast memory: time a `mib` MiB tensor copy (read + write bytes counted);
    3. compute: time a 1024^3 fp32 matmul; the CPU figures are the same measurements.
    """
    n = mib * 2**20
    buf = torch.empty(n, dtype=torch.uint8)
    with tempfile.TemporaryDirectory(dir=scratch_dir) as d:
        path = Path(d) / "calibrate.bin"
        with open(path, "wb") as f:
            f.write(memoryview(torch.randint(0, 255, (n,), dtype=torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY)
        try:
            def cold_read() -> None:
                os.posix_fadvise(fd, 0, n, os.POSIX_FADV_DONTNEED)
                os.preadv(fd, [memoryview(buf.numpy())], 0)
            link_s = time_call(cold_read, reps=repeats)
        finally:
            os.close(fd)
    src, dst = torch.ones(n // 4), torch.empty(n // 4)
    mem_s = time_call(lambda: dst.copy_(src), reps=repeats)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    mm_s = time_call(lambda: a @ b, reps=repeats)
    gflops = 2 * 1024**3 / mm_s / 1e9
    mem_gbps = 2 * n / mem_s / 1e9
    return HardwareProfile(
        name="this-machine", link_gbps=n / link_s / 1e9, fast_mem_gbps=mem_gbps, compute_tflops=gflops / 1e3,
        link_latency_us=0.0, cpu_mem_gbps=mem_gbps, cpu_gflops=gflops, measured=True,
        description=f"measured by moeinfer simulate --calibrate: cold disk reads ({mib} MiB, page cache dropped), "
                    f"RAM copy, fp32 1024^3 matmul with {torch.get_num_threads()} threads",
        details={"threads": torch.get_num_threads(), "scratch_dir": str(scratch_dir or tempfile.gettempdir()),
                 "load_avg": os.getloadavg()})
