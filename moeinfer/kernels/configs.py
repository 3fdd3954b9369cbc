"""Launch configurations of the fused Triton MoE, stored as JSON data (the layout of vLLM's
fused_moe configs): one file per GEMM shape and device, written by benchmarks/tune_moe.py.

File name: `E={E},N={N},K={K},device_name={device}.json` in moeinfer/kernels/configs/, where E is
the number of experts, N the expert inner size I and K the hidden size D (GEMM notation: the
gate_up GEMM is [tokens, K] x [K, 2N]). The file maps a token-count bucket ("1", "8", "64", ...)
to a config; the bucket nearest the actual token count (in log scale) is used. When no file matches
the shape and device, `default.json` (same layout, not device-tuned) is used.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class KernelConfig:
    block_m: int = 16  # slots per program (rows of one expert)
    block_n_gate_up: int = 64  # inner-size columns per gate_up program
    block_k_gate_up: int = 64
    block_n_down: int = 64  # hidden columns per down program
    block_k_down: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("block"):
                if v < 16 or v & (v - 1):
                    raise ValueError(f"KernelConfig.{f.name} must be a power of two >= 16 (tl.dot), got {v}")
            elif v < 1:
                raise ValueError(f"KernelConfig.{f.name} must be >= 1, got {v}")

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def config_file_name(*, E: int, N: int, K: int, device: str) -> str:
    return f"E={E},N={N},K={K},device_name={device}.json"


@lru_cache(maxsize=None)
def _read(path: Path) -> dict[int, KernelConfig]:
    try:
        raw = json.loads(path.read_text())
        return {int(bucket): KernelConfig(**cfg) for bucket, cfg in raw.items()}
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"bad fused-MoE config file {path}: {e}") from e


def nearest_bucket(table: dict[int, KernelConfig], tokens: int) -> KernelConfig:
    return table[min(table, key=lambda b: (abs(math.log2(b) - math.log2(max(tokens, 1))), b))]


def get_config(*, E: int, N: int, K: int, tokens: int, device: torch.device | str,
               config_dir: Path | None = None) -> KernelConfig:
    """The tuned config for this shape and device, else the shipped default table."""
    return nearest_bucket(_table(E, N, K, device_name(device), config_dir or CONFIG_DIR), tokens)


@lru_cache(maxsize=None)
def _table(E: int, N: int, K: int, device: str, folder: Path) -> dict[int, KernelConfig]:
    path = folder / config_file_name(E=E, N=N, K=K, device=device)
    return _read(path if path.exists() else CONFIG_DIR / "default.json")
