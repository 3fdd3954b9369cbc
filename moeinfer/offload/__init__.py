"""Expert offloading: experts in a slow tier (disk or host memory), a cache of them in fast memory,
cache policies, prefetchers, CPU-assisted experts, routing replay and a trace-driven simulator.

    import moeinfer
    from moeinfer.offload import OffloadConfig
    model = moeinfer.load("tiny")
    moeinfer.offload_(model, OffloadConfig(tier="disk", offload_dir="/tmp/experts", cache=8, policy="lru"))

See docs/offloading.md. Importing this package loads nothing heavy and touches no GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moeinfer._lazy import lazy_exports

__all__ = ["POLICIES", "PREFETCHERS", "OffloadConfig", "OffloadError", "offload_", "replay_routing_", "simulate"]

_LAZY = {
    "offload_": "moeinfer.offload.apply",
    "OffloadConfig": "moeinfer.offload.config",
    "OffloadError": "moeinfer.offload.config",
    "POLICIES": "moeinfer.offload.policies",
    "PREFETCHERS": "moeinfer.offload.prefetch",
    "simulate": "moeinfer.offload.simulator",
    "replay_routing_": "moeinfer.offload.replay",
}

if TYPE_CHECKING:
    from moeinfer.offload.apply import offload_
    from moeinfer.offload.config import OffloadConfig, OffloadError
    from moeinfer.offload.policies import POLICIES
    from moeinfer.offload.prefetch import PREFETCHERS
    from moeinfer.offload.replay import replay_routing_
    from moeinfer.offload.simulator import simulate


__getattr__ = lazy_exports(__name__, _LAZY)
