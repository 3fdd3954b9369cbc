"""A plan's prefill prediction prices each sequence's prompt with the expert cache the trace's decode
leaves (`routes.after_decode`), as a prompt meets an offloaded model in use (toy profile)."""

from __future__ import annotations

import numpy as np
import pytest
from plan_helpers import synthetic_profile, toy_quality

from moeinfer.planning import PlanOffload
from moeinfer.planning import planner
from moeinfer.planning import routing as routes
from moeinfer.planning.costs import simulate_plan
from moeinfer.planning.sizes import sizes_from_checkpoint

SIZES = sizes_from_checkpoint("tiny")
L = SIZES.num_layers


def _trace():
    return routes.uniform(num_layers=L, num_experts=SIZES.num_experts, top_k=2, sequences=3, tokens=10, seed=7)


def test_after_decode_is_batch_one_decode_then_each_sequence_in_one_forward():
    trace = _trace()
    n = trace.num_tokens
    decode, got = routes.batched(trace, 1), routes.after_decode(trace)
    assert got.num_tokens == 2 * n
    # the first n rows: batched(trace, 1) itself, one row a forward
    assert np.array_equal(got.experts[:n], decode.experts) and np.array_equal(got.step[:n], decode.step)
    # then every sequence's rows in one forward each, after the decode's steps
    assert np.array_equal(got.experts[n:], trace.experts) and np.array_equal(got.seq[n:], trace.seq)
    assert sorted(set(got.step[n:].tolist())) == [n, n + 1, n + 2]
    assert all(len(set(got.step[n:][trace.seq == s].tolist())) == 1 for s in np.unique(trace.seq))


def _plan(budget: str):
    return planner.plan("tiny", budget, quality=toy_quality(4), precisions=("bf16", "int4"),
                        profile=synthetic_profile(), trace=_trace(), probe=False)


def test_prefill_is_priced_after_the_decode_with_the_cache_it_leaves():
    """Resident plans: as a cold forward of each prompt (every expert resident: no cache state). Offloaded
    ones: the after-decode trace's time less the decode's; a warm cache makes them faster than cold."""
    plan = _plan("100MB")
    trace = _trace()
    kinds = set()
    for p in (plan, *plan.runners_up):
        kw = dict(kernel=p.kernel, fp32_weights=p.fp32_weights, offload=p.offload,
                  page_cache_bytes=max(0, planner.available_memory("cpu") - p.predicted.memory_bytes))
        cold = simulate_plan(routes.prefill(trace), SIZES, synthetic_profile(), p.precisions, **kw)
        warm_s = (simulate_plan(routes.after_decode(trace), SIZES, synthetic_profile(), p.precisions, **kw).time_s
                  - simulate_plan(routes.batched(trace, 1), SIZES, synthetic_profile(), p.precisions, **kw).time_s)
        kinds.add(p.offload is None)
        if p.offload is None:
            assert warm_s == pytest.approx(cold.time_s, rel=1e-9)
        else:
            assert warm_s < cold.time_s
        assert p.predicted.prefill_tok_s == pytest.approx(trace.num_tokens / warm_s, rel=1e-6)
    assert kinds == {True, False}
