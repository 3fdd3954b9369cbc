"""Prefetchers on hand-made traces with known answers; precision and recall through the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from offload_helpers import hand_trace, random_mixtral

from moeinfer.model.moe import route
from moeinfer.offload import OffloadConfig, simulate
from moeinfer.offload.hardware import ModelShape, load_profile
from moeinfer.offload.prefetch import (
    PREFETCHERS,
    LayerContext,
    PrefetchContext,
    make_prefetcher,
    score_predictions,
)

# layer 1's expert is always layer 0's plus one (mod 4); layer 2's is layer 0's plus two
CHAIN = hand_trace([[[e], [(e + 1) % 4], [(e + 2) % 4]] for e in [0, 1, 2, 3, 2, 1, 0, 3, 1, 2] * 3])
SHAPE = ModelShape(name="hand", num_layers=3, num_experts=4, top_k=1, hidden=8, inter=8)


def ctx(**kw) -> PrefetchContext:
    return PrefetchContext(num_layers=3, num_experts=4, top_k=1, calibration=CHAIN, **kw)


def one(layer: int, e: int) -> LayerContext:
    return LayerContext(layer, np.array([[e]]), np.array([[1.0]], dtype=np.float32))


@pytest.mark.parametrize("name", ["transition", "mlp"])
def test_learned_prefetchers_find_the_pattern(name):
    p = make_prefetcher(name, ctx())
    for e in range(4):
        assert p.predict(one(0, e)) == [(1, [(e + 1) % 4])]
        assert p.predict(one(1, e)) == [(2, [(e + 1) % 4])]
    assert p.predict(one(2, 0)) == []  # no layer after the last
    far = make_prefetcher(name, ctx(), distance=2)
    assert far.predict(one(0, 1)) == [(2, [3])] and far.predict(one(1, 1)) == []
    wide = make_prefetcher(name, ctx(), per_token=2)
    assert len(wide.predict(one(0, 0))[0][1]) == 2


def test_mlp_with_history_and_a_confidence_floor():
    p = make_prefetcher("mlp", ctx(), history=True)
    assert p.predict(one(0, 2)) == [(1, [3])]
    assert p.last[0].tolist() == [0, 0, 1, 0]  # this step's routing, the history of a later prediction
    sure = make_prefetcher("mlp", ctx(), history=True, min_prob=0.5)
    assert sure.predict(one(0, 1)) == [(1, [2])]
    never = make_prefetcher("mlp", ctx(), min_prob=0.9999)
    assert never.predict(one(0, 1)) == [(1, [])]


def test_batch_predictions_are_the_union_over_tokens():
    p = make_prefetcher("transition", ctx())
    c = LayerContext(0, np.array([[0], [2]]), np.ones((2, 1), dtype=np.float32))
    assert p.predict(c) == [(1, [1, 3])]


def test_precision_and_recall_are_scored_by_the_cache():
    cfg = OffloadConfig(tier="cpu", cache=4, prefetch="transition", calibration=CHAIN)
    r = simulate(CHAIN, shape=SHAPE, config=cfg, hardware=load_profile("h100-pcie5"))
    n = CHAIN.num_tokens
    assert (r.cache["pred_tp"], r.cache["pred_fp"], r.cache["pred_fn"]) == (2 * n, 0, 0)
    assert r.cache["precision"] == 1.0 and r.cache["recall"] == 1.0
    none = simulate(CHAIN, shape=SHAPE, config=OffloadConfig(tier="cpu", cache=4), hardware=load_profile("h100-pcie5"))
    assert none.cache["precision"] is None and none.cache["hits"] < r.cache["hits"]
    assert score_predictions([({1, 2}, {2, 3}), ({0}, {0})]) == (2 / 3, 2 / 3)


def test_next_layer_runs_the_next_router_on_this_input():
    model = random_mixtral()
    routers = [b.gate for b in model.moe_blocks()]
    p = make_prefetcher("next-layer", PrefetchContext(num_layers=3, num_experts=8, top_k=2, routers=routers))
    x = torch.randn(3, model.config.hidden_size)
    want = sorted(set(route(x, routers[1].weight, routers[1].cfg).indices.reshape(-1).tolist()))
    assert p.predict(LayerContext(0, np.zeros((3, 2), dtype=np.int64), np.ones((3, 2)), x)) == [(1, want)]
    assert p.predict(LayerContext(2, np.zeros((3, 2), dtype=np.int64), np.ones((3, 2)), x)) == []


def test_registry_and_errors():
    assert {"none", "next-layer", "transition", "mlp"} <= set(PREFETCHERS)
    with pytest.raises(ValueError, match="choose one of .*mlp.*next-layer"):
        make_prefetcher("oracle", ctx())
    with pytest.raises(ValueError, match="needs a calibration routing trace"):
        make_prefetcher("transition", PrefetchContext(num_layers=3, num_experts=4, top_k=1))
    with pytest.raises(ValueError, match="calibration trace has 3 layers x 4 experts, the model 5 x 4"):
        make_prefetcher("mlp", PrefetchContext(num_layers=5, num_experts=4, top_k=1, calibration=CHAIN))
    with pytest.raises(ValueError, match="distance must be >= 1"):
        make_prefetcher("transition", ctx(), distance=0)
