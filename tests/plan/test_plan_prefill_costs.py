"""Prefill's costs (profile version 10): the dense part pays `layer_token_s` per token beyond the first,
an expert `slot_s` per token beyond its first, and the LM head runs once per sequence of a step
(generation keeps the last position's logits), so a 64-token prompt's forward pays one head row, a
batched decode step one per row (toy numbers; tests never time anything)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from plan_helpers import synthetic_profile

from moeinfer.offload.visits import trace_steps
from moeinfer.planning import routing as routes
from moeinfer.planning.costs import MeasuredCosts, layer_seconds, simulate_plan
from moeinfer.planning.sizes import sizes_from_checkpoint


def test_dense_part_pays_per_token_host_costs_beyond_the_first():
    sizes = sizes_from_checkpoint("tiny")
    base = synthetic_profile()
    prof = replace(base, layer_token_s=5e-6)
    a = MeasuredCosts(sizes, base, ["bf16"] * sizes.num_layers, kernel="reference")
    b = MeasuredCosts(sizes, prof, ["bf16"] * sizes.num_layers, kernel="reference")
    assert b.dense_s(0, 1) == a.dense_s(0, 1)  # decode: unchanged
    assert b.dense_s(0, 64) == pytest.approx(a.dense_s(0, 64) + 63 * 5e-6)


def test_the_head_runs_once_per_sequence_of_a_step():
    trace = routes.uniform(num_layers=4, num_experts=8, top_k=2, sequences=3, tokens=16)
    prompts = trace_steps(routes.prefill(trace))
    assert len(prompts) == 3 and all(s.sequences == 1 and len(s.rows) == 16 for s in prompts)
    batched = trace_steps(routes.batched(trace, 3))
    assert {s.sequences for s in batched} == {3}


def test_a_prompts_prediction_charges_one_head_row():
    sizes = sizes_from_checkpoint("tiny")
    prof = replace(synthetic_profile(), mem_read_gbps=1e4, matmul_gflops=1.0, dense_gflops={"bfloat16": 1.0})
    trace = routes.prefill(routes.uniform(num_layers=sizes.num_layers, num_experts=sizes.num_experts,
                                          top_k=sizes.top_k, sequences=1, tokens=32))
    costs = MeasuredCosts(sizes, prof, ["bf16"] * sizes.num_layers, kernel="reference")
    per_layer, steps = layer_seconds(trace, costs)
    assert steps == pytest.approx(costs.head_s(1))  # not head_s(32): 32x the head's matmul work
    assert costs.head_s(32) - prof.step_fixed_s == pytest.approx(32 * (costs.head_s(1) - prof.step_fixed_s))
    got = simulate_plan(trace, sizes, prof, ["bf16"] * sizes.num_layers, kernel="reference")
    assert got.time_s == pytest.approx(sum(per_layer) + steps)
