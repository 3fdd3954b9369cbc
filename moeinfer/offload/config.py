"""`OffloadConfig`: where experts live, how big the fast-tier cache is, which policy and prefetcher run.

Sizes are given as an expert count (`24`, `"24"`) or bytes (`"24GB"`, `"512MB"`, `"1.5GiB"`); a byte
budget is turned into a whole number of experts once the model's expert size is known.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from moeinfer.offload.errors import OffloadError
from moeinfer.offload.policies import POLICIES
from moeinfer.offload.prefetch import PREFETCHERS

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")

TIERS = ("disk", "cpu")
SCOPES = ("global", "layer")


@dataclass(frozen=True)
class CacheSize:
    """A cache capacity: `experts` (a count) or `bytes`, exactly one set."""

    experts: int | None = None
    bytes: int | None = None

    def resolve(self, expert_bytes: int) -> int:
        """The number of whole experts this capacity holds; at least one, else a clear error."""
        if self.experts is not None:
            n = self.experts
        else:
            assert self.bytes is not None
            n = self.bytes // expert_bytes
        if n < 1:
            what = f"{self.experts} experts" if self.experts is not None else f"{self.bytes:,} bytes"
            raise OffloadError(f"expert cache of {what} holds no expert: one expert takes {expert_bytes:,} bytes; "
                               "give at least one expert (a count, or bytes such as 512MB)")
        return n

    def __str__(self) -> str:
        return f"{self.experts} experts" if self.experts is not None else f"{self.bytes:,} B"


def parse_size(value: int | str | CacheSize) -> CacheSize:
    """`24` / `"24"` -> 24 experts; `"24GB"`, `"512MB"`, `"2GiB"` -> bytes."""
    if isinstance(value, CacheSize):
        return value
    if isinstance(value, bool):
        raise TypeError(f"expert cache size must be a count or bytes, got {value!r}")
    if isinstance(value, int):
        return CacheSize(experts=value)
    m = _SIZE.match(str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"expert cache size {value!r} is neither an expert count (e.g. 24) nor bytes "
                         f"(e.g. 24GB, 512MB; units {', '.join(u for u in _UNITS if u)})")
    number, unit = m.group(1), m.group(2).upper()
    if unit == "":
        if "." in number:
            raise ValueError(f"expert cache size {value!r}: an expert count must be a whole number")
        return CacheSize(experts=int(number))
    return CacheSize(bytes=int(float(number) * _UNITS[unit]))


@dataclass
class OffloadConfig:
    """How `offload_` runs a model whose experts do not all fit in fast memory.

    tier: the slow tier holding every expert: "disk" (a safetensors expert store in `offload_dir`,
      read per expert) or "cpu" (host memory, pinned when the model is on a GPU).
    cache: fast-tier capacity, an expert count or bytes (see `parse_size`).
    scope: "global" (one pool over all layers) or "layer" (the capacity is per MoE layer: a count
      is experts per layer, bytes are split over the layers, or as the policy asks, e.g. adapmoe).
    policy / policy_args: a name in `moeinfer.offload.policies.POLICIES` and its keyword arguments.
    prefetch / prefetch_args: a name in `moeinfer.offload.prefetch.PREFETCHERS` and its arguments.
    calibration: a routing trace (path or RoutingTrace) for policies/prefetchers that learn from one
      (static, activation-aware, adapmoe, transition, mlp).
    future: the routing trace of the run itself, for the offline `belady` policy.
    cpu_assist: compute a missing expert where its weights live when the cost model says it is cheaper.
    low_bit_threshold: mixed-precision loading (HOBBIT): a missing expert whose largest gate weight is
      below this is fetched as a low-bit copy (`low_bit_bits`, groups of `low_bit_group_size` columns,
      disk tier); None = always full precision.
    timeout_s: a transfer that has not finished after this long raises OffloadError.
    remove_offload_dir: `offload_dir` is a scratch folder made for this run (`moeinfer.fsutil.scratch_dir`,
      when the caller named none): the runtime deletes it, store and all, when it closes. Never set it
      for a folder a user named.
    """

    tier: str = "disk"
    cache: int | str | CacheSize = 8
    scope: str = "global"
    policy: str = "lru"
    policy_args: dict[str, Any] = field(default_factory=dict)
    prefetch: str = "none"
    prefetch_args: dict[str, Any] = field(default_factory=dict)
    offload_dir: str | os.PathLike[str] | None = None
    calibration: Any = None
    future: Any = None
    cpu_assist: bool = False
    low_bit_threshold: float | None = None
    low_bit_bits: int = 4
    low_bit_group_size: int = 128
    timeout_s: float = 60.0
    evict_page_cache: bool = False  # benchmarks: drop each expert's pages after reading (a cold disk)
    remove_offload_dir: bool = False

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ValueError(f"offload tier {self.tier!r} is not known; choose one of {', '.join(TIERS)}")
        if self.scope not in SCOPES:
            raise ValueError(f"cache scope {self.scope!r} is not known; choose one of {', '.join(SCOPES)}")
        self.cache = parse_size(self.cache)
        if self.cache.experts is not None and self.cache.experts < 1:
            raise OffloadError(f"expert cache of {self.cache.experts} experts holds no expert: give at least 1")
        if self.tier == "disk" and self.offload_dir is None:
            raise ValueError("the disk tier needs offload_dir: a writable folder for the expert store")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.low_bit_threshold is not None and not 0.0 < self.low_bit_threshold <= 1.0:
            raise ValueError(f"low_bit_threshold must be in (0, 1], got {self.low_bit_threshold}")
        if self.low_bit_threshold is not None and self.low_bit_bits not in (2, 3, 4, 8):
            raise ValueError(f"low_bit_bits must be 2, 3, 4 or 8, got {self.low_bit_bits}")

        if self.policy not in POLICIES:
            raise ValueError(f"cache policy {self.policy!r} is not known; choose one of {', '.join(sorted(POLICIES))}")
        if self.prefetch not in PREFETCHERS:
            raise ValueError(f"prefetcher {self.prefetch!r} is not known; choose one of "
                             f"{', '.join(sorted(PREFETCHERS))}")


SPEC_FORMAT = "POLICY:CACHE[:PREFETCH[:cpu-assist]]"


def parse_offload_spec(text: str, **fields: Any) -> OffloadConfig:
    """The compact offload setting `POLICY:CACHE[:PREFETCH[:cpu-assist]]` ('lru:8', 'lfu:512MB:next_layer',
    'lru:8:none:cpu-assist'; the benchmark's offload axis) -> OffloadConfig; `fields` set the rest
    (tier, offload_dir, ...). The one parser of that form: OffloadConfig validates what it names."""
    parts = str(text).split(":")
    if (not 2 <= len(parts) <= 4 or parts[0] not in POLICIES or (len(parts) > 2 and parts[2] not in PREFETCHERS)
            or (len(parts) == 4 and parts[3] != "cpu-assist")):
        raise ValueError(f"offload {text!r}: expected {SPEC_FORMAT} with POLICY in {', '.join(sorted(POLICIES))} "
                         f"and PREFETCH in {', '.join(sorted(PREFETCHERS))}, e.g. lru:8")
    return OffloadConfig(policy=parts[0], cache=parts[1], prefetch=parts[2] if len(parts) > 2 else "none",
                         cpu_assist=len(parts) == 4, **fields)
