"""A disk tier's loads overlap expert compute in the planner's simulation only where the machine
profile found a page-cached read hidden behind expert decode (moeinfer/planning/reads.py); toy numbers,
nothing timed."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from plan_helpers import synthetic_profile

from moeinfer.offload.simulator import simulate
from moeinfer.planning import PlanOffload
from moeinfer.planning import routing as routes
from moeinfer.planning.costs import MeasuredCosts, simulate_plan
from moeinfer.planning.reads import cached_file, read_overlap
from moeinfer.planning.sizes import sizes_from_checkpoint


def _case():
    sizes = sizes_from_checkpoint("tiny")
    L = sizes.num_layers
    trace = routes.batched(routes.uniform(num_layers=L, num_experts=8, top_k=2, sequences=2, tokens=16), 1)
    return sizes, trace, PlanOffload(tier="disk", cache_experts=12, policy="lru")


@pytest.mark.parametrize("measured, overlapped", [(None, True), (0.9, True), (0.5, True), (0.2, False), (0.0, False)])
def test_loads_overlap_compute_only_where_the_profile_found_it(measured, overlapped):
    sizes, trace, off = _case()
    L = sizes.num_layers
    # a slow link: loads take long enough that hiding them behind compute shows
    prof = replace(synthetic_profile(), link_gbps=0.5, read_overlap=measured)
    assert prof.overlaps_reads() is overlapped
    got = simulate_plan(trace, sizes, prof, ["bf16"] * L, kernel="cpu", offload=off)
    # the simulator itself with that overlap gives the same time, the other one a different time
    costs = MeasuredCosts(sizes, prof, ["bf16"] * L, kernel="cpu")
    cfg = off.config(offload_dir="unused")
    same = simulate(trace, shape=sizes.shape(), config=cfg, hardware=prof.hardware(offloaded=True, precision="bf16/cpu"),
                    costs=costs, overlap=overlapped)
    other = simulate(trace, shape=sizes.shape(), config=cfg, hardware=prof.hardware(offloaded=True, precision="bf16/cpu"),
                     costs=costs, overlap=not overlapped)
    assert got.time_s == pytest.approx(same.time_s, rel=1e-12)
    assert got.cache["misses"] > 0 and got.cache["hits"] > 0
    # without overlap, a layer waits for its loads before computing: never faster
    serial, parallel = (got, other) if not overlapped else (other, got)
    assert serial.time_s > parallel.time_s


def test_read_overlap_is_a_share_and_leaves_no_file():
    seen = []
    with cached_file(1 << 16) as (fd, buf):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        assert buf.numel() == 1 << 16
    assert not os.path.exists(seen[0])
    share = read_overlap(lambda: sum(range(1000)), nbytes=1 << 16, repeats=2)
    assert 0.0 <= share <= 1.0


def test_the_plan_says_when_reads_are_priced_without_overlap():
    from plan_helpers import toy_quality

    from moeinfer.planning.costs import expert_bytes, fixed_bytes
    from moeinfer.planning.planner import plan

    sizes = sizes_from_checkpoint("tiny")
    budget = fixed_bytes(sizes, batch=1, context=256) + 8 * expert_bytes(sizes, "bf16")
    for measured, noted in ((0.1, True), (0.9, False), (None, False)):
        p = plan("tiny", budget, profile=replace(synthetic_profile(), read_overlap=measured), quality=toy_quality(4),
                 precisions=("bf16",))
        assert any("not overlapping" in n for n in p.notes) is noted


def test_the_profiles_read_is_a_share_of_its_expert_calls_bytes(monkeypatch):
    """The profile times a read of 1 / READ_SHARE of the expert call's bytes beside it (a miss's read beside
    the longer compute a decode step runs meanwhile), the call being two experts of the streaming shape."""
    import torch

    from moeinfer.planning import profile

    seen = []
    monkeypatch.setattr(profile, "read_overlap", lambda compute, *, nbytes: seen.append((compute, nbytes)) or 0.25)
    llc = 64 << 10
    assert profile._read_overlap(torch.device("cpu"), llc, "int4") == 0.25
    D, I = profile.streaming_shape("int4", llc)
    compute, nbytes = seen[0]
    assert nbytes == int(2 * profile.stored_expert_bytes("int4", D, I)) // profile.READ_SHARE
    assert profile.READ_SHARE == 4
    compute()  # the call runs (nothing timed)
