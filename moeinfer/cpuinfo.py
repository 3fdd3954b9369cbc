"""Which CPU this is: its model name and feature flags (Linux /proc/cpuinfo), recorded beside every
measurement and used to key cached machine profiles."""

from __future__ import annotations

import os
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


DEFAULT_LLC_BYTES = 64 << 20  # where the cache sizes cannot be read


def last_level_cache_bytes(root: str | Path = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """Bytes of the last-level cache cpu0 sees: the largest data or unified cache of the highest level
    under `root` (Linux sysfs: index*/level, type, size such as "32768K"), else what
    `os.sysconf("SC_LEVEL3_CACHE_SIZE")` reports (on some VMs the whole socket's), else
    DEFAULT_LLC_BYTES."""
    best: tuple[int, int] | None = None
    for index in sorted(Path(root).glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _size_bytes((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified") and (best is None or (level, size) > best):
            best = (level, size)
    if best is not None:
        return best[1]
    try:
        size = os.sysconf("SC_LEVEL3_CACHE_SIZE")
    except (ValueError, OSError, AttributeError):
        size = 0
    return size if size > 0 else DEFAULT_LLC_BYTES


def _size_bytes(text: str) -> int:
    """"32768K" / "1M" / "512" -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)
