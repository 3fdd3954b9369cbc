"""`simulate_plan(speed=)`: a step's compute and an offloaded layer's host time run at the machine's
probed speed, a load's transfer over the link (its bytes and its latency) does not (toy profile)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from plan_helpers import synthetic_profile

from moeinfer.planning import PlanOffload
from moeinfer.planning import routing as routes
from moeinfer.planning.costs import simulate_plan
from moeinfer.planning.sizes import sizes_from_checkpoint

SIZES = sizes_from_checkpoint("tiny")
L, E = SIZES.num_layers, SIZES.num_experts


def _trace():
    return routes.uniform(num_layers=L, num_experts=E, top_k=2, sequences=3, tokens=12, seed=5)


@pytest.mark.parametrize("speed", [0.5, 1.7])
@pytest.mark.parametrize("view", ["decode", "prefill"])
def test_a_resident_plan_runs_exactly_at_the_speed(speed, view):
    trace = routes.batched(_trace(), 1) if view == "decode" else routes.prefill(_trace())
    prof = synthetic_profile()
    for precision in ("bf16", "int4"):
        plain = simulate_plan(trace, SIZES, prof, [precision] * L, kernel="reference")
        fast = simulate_plan(trace, SIZES, prof, [precision] * L, kernel="reference", speed=speed)
        assert fast.time_s == pytest.approx(plain.time_s / speed, rel=1e-12)
        assert fast.cache == plain.cache


@pytest.mark.parametrize("speed", [0.5, 1.7])
@pytest.mark.parametrize("view", ["decode", "prefill"])
def test_an_offloaded_plans_loads_keep_their_transfer_time(speed, view):
    """Loads that do not overlap compute (the profile found none hidden) add bytes / link + latency each,
    at any speed; everything else (dense part, experts, head, a visit's host time) is over the speed."""
    trace = routes.batched(_trace(), 1) if view == "decode" else routes.prefill(_trace())
    prof = replace(synthetic_profile(), read_overlap=0.0, offload_layer_s=2e-4, load_latency_s=1e-3)
    assert not prof.overlaps_reads()
    off = PlanOffload(tier="disk", cache_experts=6, policy="lru")
    plain = simulate_plan(trace, SIZES, prof, ["bf16"] * L, kernel="reference", offload=off)
    at = simulate_plan(trace, SIZES, prof, ["bf16"] * L, kernel="reference", offload=off, speed=speed)
    assert at.cache == plain.cache and at.bytes_moved == plain.bytes_moved
    hw = prof.hardware(offloaded=True, precision="bf16")
    loads = plain.cache["demand_loads"] + plain.cache["prefetch_loads"]
    link = plain.bytes_moved / (hw.link_gbps * 1e9) + loads * hw.latency_s(view == "prefill")
    assert loads > 0 and link > 0.05 * plain.time_s  # the loads are a fair share of the time
    assert at.time_s == pytest.approx((plain.time_s - link) / speed + link, rel=1e-9)
    # scaling the whole time (the planner until the nineteenth session) would have been off by this much
    assert abs(at.time_s - plain.time_s / speed) > 0.02 * at.time_s
