"""Expert parallelism on torch.distributed: placement, replication, all-to-all dispatch, statistics,
and a simulator for clusters this machine does not have. Nothing here initialises a backend on import.

    from moeinfer.parallel import apply_expert_parallel_, init_distributed
    init_distributed()                                   # under torchrun
    apply_expert_parallel_(model, placement="contiguous")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moeinfer._lazy import lazy_exports

__all__ = [
    "STRATEGIES",
    "ExpertParallelConfig",
    "ExpertParallelError",
    "Placement",
    "PlacementError",
    "RoutingProfile",
    "apply_expert_parallel_",
    "expert_parallel_stats",
    "gather_stats",
    "init_distributed",
    "is_primary",
    "load_expert_parallel",
    "make_placement",
    "read_profile",
    "summarize",
]

_LAZY = {
    "apply_expert_parallel_": "moeinfer.parallel.apply",
    "load_expert_parallel": "moeinfer.parallel.apply",
    "expert_parallel_stats": "moeinfer.parallel.apply",
    "ExpertParallelConfig": "moeinfer.parallel.config",
    "ExpertParallelError": "moeinfer.parallel.dist",
    "init_distributed": "moeinfer.parallel.dist",
    "is_primary": "moeinfer.parallel.dist",
    "Placement": "moeinfer.parallel.placement",
    "PlacementError": "moeinfer.parallel.placement",
    "make_placement": "moeinfer.parallel.placement",
    "STRATEGIES": "moeinfer.parallel.placement",
    "RoutingProfile": "moeinfer.parallel.profile",
    "read_profile": "moeinfer.parallel.profile",
    "gather_stats": "moeinfer.parallel.stats",
    "summarize": "moeinfer.parallel.stats",
}

if TYPE_CHECKING:
    from moeinfer.parallel.apply import apply_expert_parallel_, expert_parallel_stats, load_expert_parallel
    from moeinfer.parallel.config import ExpertParallelConfig
    from moeinfer.parallel.dist import ExpertParallelError, init_distributed, is_primary
    from moeinfer.parallel.placement import STRATEGIES, Placement, PlacementError, make_placement
    from moeinfer.parallel.profile import RoutingProfile, read_profile
    from moeinfer.parallel.stats import gather_stats, summarize


__getattr__ = lazy_exports(__name__, _LAZY)
