"""The dense part and LM head are priced at the matmul rate of the checkpoint's dtype (toy numbers)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from plan_helpers import synthetic_profile

from moeinfer.planning.costs import MeasuredCosts
from moeinfer.planning.profile import MachineProfile
from moeinfer.planning.sizes import sizes_from_checkpoint


def test_dense_and_head_use_the_checkpoint_dtype_rate():
    sizes = sizes_from_checkpoint("tiny")
    assert sizes.dtype == "bfloat16"
    # compute-bound numbers: 10 TB/s of memory, so only the matmul rate matters
    prof = replace(synthetic_profile(), mem_read_gbps=1e4, matmul_gflops=50.0,
                   dense_gflops={"float32": 50.0, "bfloat16": 5.0})
    T = 64
    bf16 = MeasuredCosts(sizes, prof, ["bf16"] * sizes.num_layers, kernel="reference")
    want_head = prof.step_fixed_s + 2.0 * sizes.head_params * T / 5e9
    assert bf16.head_s(T) == pytest.approx(want_head, rel=1e-9)
    want_dense = prof.layer_fixed_s + prof.rate("bf16/reference").call_s + 2.0 * sizes.dense_params_per_layer * T / 5e9
    assert bf16.dense_s(0, T) == pytest.approx(want_dense, rel=1e-9)
    # the same model in fp32 runs its dense part 10x faster on this toy machine
    fp32 = MeasuredCosts(replace(sizes, dtype="float32"), prof, ["bf16"] * sizes.num_layers, kernel="reference")
    assert fp32.head_s(T) - prof.step_fixed_s == pytest.approx((want_head - prof.step_fixed_s) / 10, rel=1e-9)


def test_a_profile_without_dtype_rates_falls_back_to_fp32_and_round_trips():
    prof = synthetic_profile()
    assert prof.matmul_rate("bfloat16") == prof.matmul_gflops * 1e9
    measured = replace(prof, dense_gflops={"bfloat16": 4.5})
    back = MachineProfile.from_dict(measured.to_dict())
    assert back == measured and back.matmul_rate("bfloat16") == 4.5e9


def test_offloaded_layers_and_loads_pay_the_profiles_host_costs():
    from moeinfer.planning import PlanOffload
    from moeinfer.planning import routing as routes
    from moeinfer.planning.costs import simulate_plan

    sizes = sizes_from_checkpoint("tiny")
    L = sizes.num_layers
    tr = routes.batched(routes.uniform(num_layers=L, num_experts=8, top_k=2, sequences=2, tokens=8), 1)
    off = PlanOffload(tier="disk", cache_experts=10, policy="lru")
    base = synthetic_profile()
    plain = simulate_plan(tr, sizes, base, ["bf16"] * L, kernel="reference", offload=off)
    # each offloaded layer visit costs 1 ms more: exactly steps x layers ms more in all
    host = simulate_plan(tr, sizes, replace(base, offload_layer_s=1e-3), ["bf16"] * L, kernel="reference",
                         offload=off)
    assert host.time_s - plain.time_s == pytest.approx(plain.steps * L * 1e-3, rel=1e-9)
    # a load latency of 50 ms makes the link the bottleneck: at least one latency per load
    slow = simulate_plan(tr, sizes, replace(base, load_latency_s=0.05), ["bf16"] * L, kernel="reference",
                         offload=off)
    loads = slow.cache["demand_loads"] + slow.cache["prefetch_loads"]
    assert loads > 0 and slow.time_s >= loads * 0.05
    # a resident configuration pays neither
    res = [simulate_plan(tr, sizes, p, ["bf16"] * L, kernel="reference")
           for p in (base, replace(base, offload_layer_s=1e-3, load_latency_s=0.05))]
    assert res[0].time_s == res[1].time_s


def test_offloaded_quantized_layers_pay_their_own_precisions_host_costs():
    """An offloaded int4 plan is charged the host costs measured for offloaded int4 layers (one native
    call per cached expert), a float one the float figures; a preset not measured falls back to those."""
    from moeinfer.planning import PlanOffload
    from moeinfer.planning import routing as routes
    from moeinfer.planning.costs import simulate_plan
    from moeinfer.planning.profile import OffloadHost

    sizes = sizes_from_checkpoint("tiny")
    L = sizes.num_layers
    tr = routes.batched(routes.uniform(num_layers=L, num_experts=8, top_k=2, sequences=2, tokens=8), 1)
    off = PlanOffload(tier="disk", cache_experts=10, policy="lru")
    base = replace(synthetic_profile(), offload_layer_s=1e-4)
    measured = replace(base, offload_host={"int4": OffloadHost(layer_s=2e-3, load_latency_s=0.0)})
    assert measured.offload_costs("int4") == OffloadHost(2e-3, 0.0)
    assert measured.offload_costs("int8") == measured.offload_costs("bf16") == OffloadHost(1e-4, 0.0)
    q_plain = simulate_plan(tr, sizes, base, ["int4"] * L, kernel="reference", offload=off)
    q_host = simulate_plan(tr, sizes, measured, ["int4"] * L, kernel="reference", offload=off)
    # same cache decisions; every layer visit costs 2 ms - 0.1 ms more
    assert q_host.cache == q_plain.cache
    assert q_host.time_s - q_plain.time_s == pytest.approx(q_plain.steps * L * (2e-3 - 1e-4), rel=1e-9)
    f_plain = simulate_plan(tr, sizes, base, ["bf16"] * L, kernel="reference", offload=off)
    f_host = simulate_plan(tr, sizes, measured, ["bf16"] * L, kernel="reference", offload=off)
    assert f_host.time_s == f_plain.time_s
    back = MachineProfile.from_dict(measured.to_dict())
    assert back == measured and back.offload_costs("int4") == OffloadHost(2e-3, 0.0)


def test_a_disk_tier_the_page_cache_holds_is_read_at_the_cached_rate():
    """cached_fraction = free memory over the store's bytes (at most 1); the link's time per byte is
    blended between the cached-read and the cold-disk rates by it."""
    from moeinfer.planning import PlanOffload
    from moeinfer.planning import routing as routes
    from moeinfer.planning.costs import cached_fraction, expert_bytes, simulate_plan

    sizes = sizes_from_checkpoint("tiny")
    L, E = sizes.num_layers, sizes.num_experts
    store = L * E * expert_bytes(sizes, "bf16")
    prof = replace(synthetic_profile(), cached_link_gbps=9.0)  # disk 1 GB/s
    assert cached_fraction(sizes, prof, "bf16", tier="disk", page_cache_bytes=0) == 0.0
    assert cached_fraction(sizes, prof, "bf16", tier="disk", page_cache_bytes=store // 4) == pytest.approx(0.25)
    assert cached_fraction(sizes, prof, "bf16", tier="disk", page_cache_bytes=10 * store) == 1.0
    assert cached_fraction(sizes, prof, "bf16", tier="cpu", page_cache_bytes=10 * store) == 0.0  # not a disk
    int4_store = L * E * expert_bytes(sizes, "int4")
    assert cached_fraction(sizes, prof, "int4", tier="disk", page_cache_bytes=int4_store // 2) == pytest.approx(0.5)
    # half cached: 1 / (0.5 / 9 + 0.5 / 1) GB/s; no cached rate measured (an older profile): the disk's
    assert prof.effective_link_gbps(0.5) == pytest.approx(1.0 / (0.5 / 9.0 + 0.5 / 1.0))
    assert prof.effective_link_gbps(1.0) == pytest.approx(9.0)
    assert synthetic_profile().effective_link_gbps(1.0) == 1.0
    # the simulator moves the same bytes over a faster link: same cache, less time; 0 bytes: unchanged
    tr = routes.batched(routes.uniform(num_layers=L, num_experts=E, top_k=2, sequences=2, tokens=8), 1)
    off = PlanOffload(tier="disk", cache_experts=4, policy="lru")
    cold = simulate_plan(tr, sizes, prof, ["bf16"] * L, kernel="reference", offload=off)
    same = simulate_plan(tr, sizes, replace(prof, cached_link_gbps=None), ["bf16"] * L, kernel="reference",
                         offload=off, page_cache_bytes=10 * store)
    warm = simulate_plan(tr, sizes, prof, ["bf16"] * L, kernel="reference", offload=off, page_cache_bytes=10 * store)
    assert same.time_s == cold.time_s
    assert warm.cache == cold.cache and warm.bytes_moved == cold.bytes_moved and warm.time_s < cold.time_s
    back = MachineProfile.from_dict(prof.to_dict())
    assert back.cached_link_gbps == 9.0
