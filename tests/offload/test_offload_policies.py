"""Expert cache policies on hand-made visit sequences with known answers."""

from __future__ import annotations

import pytest
from offload_helpers import hand_trace

from moeinfer.offload.cache import ExpertCache, resolve_capacities, transient_buffers
from moeinfer.offload.config import OffloadConfig, OffloadError, parse_size
from moeinfer.offload.policies import POLICIES, PolicyContext, lru_hits, make_policy
from moeinfer.offload.visits import Visit, all_visits


def v(layer: int, *experts: int, weight: float = 1.0) -> Visit:
    return Visit(layer=layer, experts=tuple(sorted(experts)), tokens=(1,) * len(experts),
                 max_weight=(weight,) * len(experts))


def run(policy: str, visits: list[Visit], *, capacity: list[int], layers: int = 1, experts: int = 4,
        calibration=None, future=None, threshold: float | None = None, **kw) -> ExpertCache:
    ctx = PolicyContext(num_layers=layers, num_experts=experts, calibration=calibration, future=future)
    cache = ExpertCache(num_layers=layers, num_experts=experts, capacities=capacity,
                        policy=make_policy(policy, ctx, **kw), expert_bytes=100, low_bit_bytes=30,
                        low_bit_threshold=threshold)
    cache.warm()
    for x in visits:
        cache.visit(x)
    return cache


SEQ = [v(0, e) for e in (0, 0, 1, 2, 1, 2, 0)]


def test_lru_and_lfu_known_answers():
    # LRU: m0 h0 m1 m2(evict 0) h1 h2 m0 -> 3 hits; LFU keeps the twice-used 0: m0 h0 m1 m2(evict 1) m1(evict 2)
    # m2 (0 and 1 tie on count, 0 is older) m0 -> 1 hit.
    assert run("lru", SEQ, capacity=[2]).stats.hits == 3
    lfu = run("lfu", SEQ, capacity=[2])
    assert (lfu.stats.hits, lfu.stats.misses, lfu.stats.evictions) == (1, 6, 4)


def test_belady_is_optimal_and_bypasses():
    cyc = [v(0, e) for e in (0, 1, 2, 0, 1, 2)]
    future = all_visits(hand_trace([[[e]] for e in (0, 1, 2, 0, 1, 2)]))
    bel = run("belady", cyc, capacity=[2], future=future)
    assert (bel.stats.hits, bel.stats.transient_loads) == (2, 2)  # 2 is used last: streamed, not cached
    assert run("lru", cyc, capacity=[2]).stats.hits == 0
    # on the LRU/LFU sequence Belady hits at least as often as both
    fut = all_visits(hand_trace([[[x.experts[0]]] for x in SEQ]))
    assert run("belady", SEQ, capacity=[2], future=fut).stats.hits == 3


def test_belady_detects_a_diverging_run():
    future = all_visits(hand_trace([[[0]], [[1]]]))
    with pytest.raises(OffloadError, match="diverged"):
        run("belady", [v(0, 0), v(0, 2)], capacity=[1], future=future)
    with pytest.raises(ValueError, match="future"):
        run("belady", [v(0, 0)], capacity=[1])


def test_static_keeps_the_popular_experts():
    calib = hand_trace([[[3]], [[3]], [[3]], [[2]], [[2]], [[1]]])
    cache = run("static", [v(0, e) for e in (0, 2, 3, 1, 3)], capacity=[2], calibration=calib)
    s = cache.stats
    assert (s.warm_loads, s.hits, s.misses, s.transient_loads, s.evictions) == (2, 3, 2, 2, 0)
    assert set(cache.resident) == {(0, 2), (0, 3)}
    with pytest.raises(ValueError, match="calibration"):
        run("static", [], capacity=[2])


def test_activation_aware_matches_the_closest_request():
    calib = hand_trace([[[0]], [[0]], [[0]], [[2]], [[1]], [[1]], [[1]], [[3]]], seq=[0, 0, 0, 0, 1, 1, 1, 1])
    aa = run("activation-aware", [v(0, 0), v(0, 3), v(0, 2)], capacity=[2], calibration=calib, rematch_every=1)
    assert aa.policy.matched[0, 0] == 0.75  # matched to request 0
    assert set(aa.resident) == {(0, 0), (0, 2)}  # 3 evicted: the matched request (seq 0) rarely uses it
    lru = run("lru", [v(0, 0), v(0, 3), v(0, 2)], capacity=[2])
    assert set(lru.resident) == {(0, 3), (0, 2)}


def test_hobbit_evicts_low_precision_copies_first_and_upgrades_in_place():
    visits = [v(0, 0, weight=0.9), v(0, 1, weight=0.1), v(0, 2, weight=0.9)]
    h = run("hobbit", visits, capacity=[2], threshold=0.5, w_recency=0.0, w_frequency=0.0, w_precision=1.0)
    assert set(h.resident) == {(0, 0), (0, 2)}
    assert h.stats.low_bit_loads == 1 and h.stats.bytes_loaded == 100 + 30 + 100
    lru = run("lru", visits, capacity=[2], threshold=0.5)
    assert set(lru.resident) == {(0, 1), (0, 2)}
    # a low-bit copy does not serve a token that wants full precision: miss, reloaded into the same slot
    up = run("lru", [v(0, 1, weight=0.1), v(0, 1, weight=0.1), v(0, 1, weight=0.9)], capacity=[1], threshold=0.5)
    assert (up.stats.hits, up.stats.misses, up.stats.evictions, up.low[(0, 1)]) == (1, 2, 0, False)


def test_adapmoe_gives_slots_to_the_layers_that_use_them():
    # layer 0 always uses expert 0; layer 1 cycles over 1, 2, 3
    calib = hand_trace([[[0], [1 + t % 3]] for t in range(12)])
    p = make_policy("adapmoe", PolicyContext(num_layers=2, num_experts=4, calibration=calib))
    assert p.layer_capacities(4) == [1, 3]
    assert lru_hits([(0,), (0,), (1,)], 1) == 1
    with pytest.raises(ValueError, match="scope='layer'"):
        resolve_capacities(4, scope="global", num_layers=2, num_experts=4, expert_bytes=1, policy=p)
    assert resolve_capacities(2, scope="layer", num_layers=2, num_experts=4, expert_bytes=1, policy=p) == [1, 3]


def test_per_layer_pools_are_separate():
    visits = [v(0, 0), v(1, 0), v(0, 1), v(1, 0), v(0, 0)]
    c = run("lru", visits, capacity=[1, 1], layers=2)
    assert c.stats.layer_hits == [0, 1] and c.stats.layer_misses == [3, 1]


def test_visit_needing_more_than_the_pool_streams_the_rest():
    c = run("lru", [v(0, 0, 1, 2), v(0, 0, 1, 2)], capacity=[2])
    assert (c.stats.hits, c.stats.misses, c.stats.transient_loads) == (2, 4, 2)


def test_registry_and_sizes():
    assert {"lru", "lfu", "static", "activation-aware", "hobbit", "adapmoe", "belady"} <= set(POLICIES)
    with pytest.raises(ValueError, match="choose one of .*belady.*lru"):
        OffloadConfig(tier="cpu", policy="fifo")
    with pytest.raises(ValueError, match="prefetcher 'magic' is not known"):
        OffloadConfig(tier="cpu", prefetch="magic")
    assert parse_size("24GB").bytes == 24 * 10**9 and parse_size("512MiB").bytes == 512 * 2**20
    assert parse_size("6").experts == 6 and parse_size(6).experts == 6
    with pytest.raises(ValueError, match="neither an expert count"):
        parse_size("lots")
    with pytest.raises(OffloadError, match="holds no expert: one expert takes 442,368 bytes"):
        resolve_capacities("100KB", scope="global", num_layers=4, num_experts=8, expert_bytes=442368,
                           policy=make_policy("lru", PolicyContext(4, 8)))
    with pytest.raises(OffloadError, match="fewer than one per layer"):
        resolve_capacities("1MB", scope="layer", num_layers=4, num_experts=8, expert_bytes=442368,
                           policy=make_policy("lru", PolicyContext(4, 8)))
    with pytest.raises(OffloadError, match="holds no expert"):
        OffloadConfig(tier="cpu", cache=0)
    with pytest.raises(ValueError, match="offload_dir"):
        OffloadConfig(tier="disk")


def _outcomes(policy: str, visits: list[Visit], **kw) -> str:
    """The cache's per-visit answer as a string: H (all experts hit) or M (a miss) per visit."""
    ctx = PolicyContext(num_layers=kw.pop("layers", 1), num_experts=kw.pop("experts", 4))
    cache = ExpertCache(num_layers=ctx.num_layers, num_experts=ctx.num_experts, capacities=kw.pop("capacity"),
                        policy=make_policy(policy, ctx), expert_bytes=100)
    return "".join("H" if not cache.visit(x).loads else "M" for x in visits)


def test_hit_miss_sequences_known_answers():
    """Per visit, not only in total: worked by hand in test_lru_and_lfu_known_answers' comment."""
    assert _outcomes("lru", SEQ, capacity=[2]) == "MHMMHHM"
    assert _outcomes("lfu", SEQ, capacity=[2]) == "MHMMMMM"
    # a cycle one longer than the cache defeats LRU completely; capacity 3 holds it after the first pass
    cycle = [v(0, e) for e in (0, 1, 2) * 3]
    assert _outcomes("lru", cycle, capacity=[2]) == "M" * 9
    assert _outcomes("lru", cycle, capacity=[3]) == "MMM" + "H" * 6


def _textbook_lru(visits: list[Visit], capacity: int) -> list[int]:
    """An LRU written from its definition, independent of moeinfer.offload: hits per visit, one pool per
    layer. A visit's experts are used at the same instant; a miss fills a free slot or evicts the expert
    used longest ago (the lower expert id among equals) that this visit does not need."""
    last: dict[int, dict[int, int]] = {}  # layer -> {resident expert: time of last use}
    out = []
    for t, x in enumerate(visits):
        pool = last.setdefault(x.layer, {})
        out.append(sum(e in pool for e in x.experts))
        for e in x.experts:
            if e not in pool and len(pool) >= capacity:
                others = [k for k in pool if k not in x.experts]
                if not others:
                    continue  # every slot holds an expert of this visit: streamed, not cached
                del pool[min(others, key=lambda k: (pool[k], k))]
            pool[e] = t
    return out


def test_lru_agrees_with_a_textbook_lru_on_real_mixtral_routing():
    """The shipped trimmed real trace (32 tokens x 32 layers, top-2 of 8), per-layer pools of 4: every
    visit's hit count equals an independent LRU's, and the hit rate is in the range the trace README
    reports for the full files (57-60% at 4 of 8), within the noise of 32 tokens."""
    from pathlib import Path

    from moeinfer.traces.convert import convert_mixtral

    trace = convert_mixtral(Path(__file__).parents[1] / "data/traces/mixtral-8x7b-instruct/gsm8k_routing_trimmed.jsonl")
    visits = all_visits(trace)
    ctx = PolicyContext(num_layers=32, num_experts=8)
    cache = ExpertCache(num_layers=32, num_experts=8, capacities=[4] * 32, policy=make_policy("lru", ctx),
                        expert_bytes=1)
    ours = [len(cache.visit(x).hits) for x in visits]
    assert ours == _textbook_lru(visits, 4)
    rate = sum(ours) / (2 * len(visits))
    assert 0.45 <= rate <= 0.70, rate


def test_a_transient_buffer_is_counted_where_a_visit_can_need_more_than_a_pool():
    """One expert's buffer beside the slots where some pool holds fewer experts than a layer (8 here),
    or where the policy refuses newcomers; none where every pool holds a layer and every miss is placed."""
    assert transient_buffers([7], 8) == 1 and transient_buffers([8, 3], 8) == 1
    assert transient_buffers([8], 8) == 0 and transient_buffers([30], 8) == 0
    assert transient_buffers([30], 8, admits_all=False) == 1


@pytest.mark.parametrize("n,k", [(1, 1), (1, 2), (1, 8), (3, 2), (4, 8), (16, 2)])
def test_small_visits_counted_in_python_equal_numpys(n, k, monkeypatch):
    """A visit of a few token-slots (a decode step's) is counted in plain Python: the same Visit as the
    numpy path on random routings with unused slots (-1), equal weights, a NaN weight."""
    import numpy as np

    import moeinfer.offload.visits as visits

    rng = np.random.default_rng(n * 10 + k)
    cases = []
    for _ in range(20):
        experts = rng.integers(-1, 6, size=(n, k))
        weights = rng.random((n, k)).astype(np.float32)
        cases.append((experts, weights))
    experts, weights = cases[0][0].copy(), np.full((n, k), 0.5, dtype=np.float32)
    cases.append((experts, weights))
    weights = cases[1][1].copy()
    weights[0, 0] = np.nan
    cases.append((cases[1][0], weights))
    assert n * k <= visits.SMALL_VISIT
    small = [visits.visit_of(3, e, w) for e, w in cases]
    monkeypatch.setattr(visits, "SMALL_VISIT", -1)
    big = [visits.visit_of(3, e, w) for e, w in cases]
    for a, b in zip(small, big):
        assert (a.layer, a.experts, a.tokens) == (b.layer, b.experts, b.tokens)
        assert np.array_equal(np.array(a.max_weight), np.array(b.max_weight), equal_nan=True)
        assert all(type(x) is int for x in a.experts + a.tokens) and all(type(x) is float for x in a.max_weight)
