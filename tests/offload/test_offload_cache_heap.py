"""The cache's heap of LRU / LFU ranks picks the same victims as ranking every candidate."""

from __future__ import annotations

import random

import pytest

from moeinfer.offload.cache import ExpertCache
from moeinfer.offload.policies import PolicyContext, make_policy
from moeinfer.offload.visits import Visit


def _visits(seed: int, *, layers: int, experts: int, n: int) -> list[Visit]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        layer = i % layers
        k = rng.randint(1, 3)
        # skewed: low expert ids are popular, so LFU counts differ and ties happen too
        picks = sorted({min(int(rng.expovariate(0.4)), experts - 1) for _ in range(k)})
        out.append(Visit(layer=layer, experts=tuple(picks), tokens=(1,) * len(picks),
                         max_weight=(1.0,) * len(picks)))
    return out


def _replay(policy: str, visits: list[Visit], *, capacities: list[int], layers: int, experts: int,
            heap: bool) -> tuple[list[tuple], ExpertCache]:
    ctx = PolicyContext(num_layers=layers, num_experts=experts)
    cache = ExpertCache(num_layers=layers, num_experts=experts, capacities=capacities,
                        policy=make_policy(policy, ctx), expert_bytes=1)
    if not heap:
        cache.rank = None  # the scan over every candidate (the policy's `victim`)
    assert (cache.rank is not None) == heap
    log = []
    for v in visits:
        plan = cache.visit(v)
        log.append((dict(plan.hits), [(ld.key, ld.slot, ld.evicted) for ld in plan.loads]))
        if v.layer == 0 and len(log) % 7 == 0:  # prefetches place keys too (pinned within the visit)
            for ld in cache.prefetch((v.layer + 1) % layers, [0, experts - 1]):
                log.append(("prefetch", ld.key, ld.slot, ld.evicted))
    return log, cache


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("capacities", [[5], [2, 3, 1]], ids=["global", "per-layer"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heap_victims_equal_the_scan(policy: str, capacities: list[int], seed: int) -> None:
    layers, experts = 3, 8
    visits = _visits(seed, layers=layers, experts=experts, n=600)
    fast, c_fast = _replay(policy, visits, capacities=capacities, layers=layers, experts=experts, heap=True)
    slow, c_slow = _replay(policy, visits, capacities=capacities, layers=layers, experts=experts, heap=False)
    assert fast == slow
    assert c_fast.stats.evictions == c_slow.stats.evictions > 100  # the heap was exercised
    assert c_fast.resident == c_slow.resident
    # stale entries are compacted: the heaps stay bounded by the rebuild threshold
    assert all(len(h) <= 4 * c + 64 + 1 for h, c in zip(c_fast.heaps, c_fast.capacities))


def test_policies_without_a_stable_rank_keep_the_scan() -> None:
    ctx = PolicyContext(num_layers=1, num_experts=4)
    for name in ("hobbit", "lru", "lfu"):
        cache = ExpertCache(num_layers=1, num_experts=4, capacities=[2], policy=make_policy(name, ctx),
                            expert_bytes=1)
        assert (cache.rank is None) == (name == "hobbit")
