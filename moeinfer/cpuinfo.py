"""Which CPU this is: its model name and feature flags (Linux /proc/cpuinfo), recorded beside every
measurement and used to key cached machine profiles."""

from __future__ import annotations

import platform
from pathlib import Path


def _field(prefix: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), else what platform reports."""
    return _field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's feature flags (avx2, avx512_bf16, amx_tile, ...), empty where /proc/cpuinfo is absent."""
    flags = _field("flags")
    return flags.split() if flags else []
