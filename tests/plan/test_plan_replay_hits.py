"""The planner's simulated hit counts equal a live run's under the planner's offload settings (global
slots, LRU / LFU, disk tier) with real Mixtral routing replayed, as the real-shape benchmark runs it:
one row per forward (a one-token prompt, then decode) is the planner's decode view; a prompt of several
tokens is a forward of several rows, which the simulator matches when given that grouping, and which
loads every expert its rows use (the benchmark's live hit rate fell below the planner's for that)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from offload_helpers import random_mixtral
from plan_helpers import synthetic_profile

import moeinfer
from moeinfer.offload import offload_, replay_routing_
from moeinfer.planning import PlanOffload
from moeinfer.planning import routing as routes
from moeinfer.planning.costs import simulate_plan
from moeinfer.planning.sizes import sizes_from_model
from moeinfer.traces.convert import convert_mixtral
from moeinfer.traces.trace import RoutingTrace

MIXTRAL = Path(__file__).resolve().parents[1] / "data" / "traces" / "mixtral-8x7b-instruct" / "gsm8k_routing_trimmed.jsonl"


def _decode_view() -> RoutingTrace:
    """The trimmed real trace cut to 2 MoE layers, one row per step in the planner's order."""
    return routes.batched(routes.layers(convert_mixtral(MIXTRAL), [0, 1]), 1)


def _grouped(trace: RoutingTrace, forwards: list[int]) -> RoutingTrace:
    """`trace`'s first rows, `forwards[i]` of them run together in forward i (the replay's order)."""
    n = sum(forwards)
    step = np.repeat(np.arange(len(forwards)), forwards).astype(np.int32)
    return RoutingTrace(experts=trace.experts[:n], weights=trace.weights[:n], seq=np.zeros(n), pos=np.arange(n),
                        is_prompt=np.zeros(n, bool), layers=trace.layers, num_experts=trace.num_experts, step=step)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("slots", [3, 6])
@pytest.mark.parametrize("prompt_tokens", [1, 4])
def test_simulated_hits_equal_the_live_run_with_replayed_routing(tmp_path, policy, slots, prompt_tokens):
    trace = _decode_view()
    new_tokens = 10
    forwards = [prompt_tokens] + [1] * (new_tokens - 1)  # generate: the prompt in one forward, then one row each
    off = PlanOffload(tier="disk", cache_experts=slots, scope="global", policy=policy)
    model = random_mixtral(layers=2, hidden=16, inter=16, vocab=64)
    sizes = sizes_from_model(model)
    offload_(model, off.config(offload_dir=tmp_path))
    try:
        replay_routing_(model, trace)
        moeinfer.generate(model, [list(range(1, prompt_tokens + 1))], max_new_tokens=new_tokens, ignore_eos=True)
        live = model.offload.cache.stats
        live_counts = (live.hits, live.misses)
    finally:
        model.offload.close()
    sim = simulate_plan(_grouped(trace, forwards), sizes, synthetic_profile(), ["bf16"] * 2, kernel="reference",
                        offload=off)
    assert (sim.cache["hits"], sim.cache["misses"]) == live_counts
    assert live_counts[0] + live_counts[1] > 0
    # the planner's decode view of the same rows: one row per step
    rows = prompt_tokens + new_tokens - 1
    view = simulate_plan(routes.subset(trace, np.arange(rows)), sizes, synthetic_profile(), ["bf16"] * 2,
                         kernel="reference", offload=off)
    if prompt_tokens == 1:  # the same forwards
        assert (view.cache["hits"], view.cache["misses"]) == live_counts
    else:  # the prompt's forward loads every expert its rows use at once: a lower hit rate than row by row
        assert view.hit_rate > live_counts[0] / sum(live_counts)
