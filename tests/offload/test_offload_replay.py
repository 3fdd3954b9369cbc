"""Routing replay: forced routing from a trace, shape checks, and the real Mixtral traces driving the
cache of a random Mixtral-shaped model exactly as the simulator predicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from offload_helpers import generate_with_logits, random_mixtral

import moeinfer
from moeinfer.traces.trace import RoutingTrace, TraceError, record_routing
from moeinfer.offload import OffloadConfig, offload_, replay_routing_, simulate
from moeinfer.offload.hardware import ModelShape, load_profile
from moeinfer.offload.replay import restore_routing_

# A trimmed copy of the real traces ships with the tests (its README cites the source), so this runs everywhere.
MIXTRAL = Path(__file__).resolve().parents[1] / "data" / "traces" / "mixtral-8x7b-instruct" / "gsm8k_routing_trimmed.jsonl"


def random_trace(n: int, layers: int = 3, experts: int = 8, seed: int = 1) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    e = np.stack([np.stack([rng.choice(experts, 2, replace=False) for _ in range(layers)]) for _ in range(n)])
    w = rng.uniform(0.2, 0.8, size=(n, layers, 1))
    return RoutingTrace(experts=e, weights=np.concatenate([w, 1 - w], axis=2), seq=np.zeros(n), pos=np.arange(n),
                        is_prompt=np.zeros(n, dtype=bool), layers=np.arange(layers), num_experts=experts)


def test_replay_forces_the_trace_routing():
    model = random_mixtral()
    trace = random_trace(12)
    replay_routing_(model, trace)
    with record_routing(model, logits=False) as rec:
        moeinfer.generate(model, [[1, 2, 3]], max_new_tokens=10)  # 3 + 10 - 1 = 12 rows
    got = rec.trace()
    assert np.array_equal(got.experts, trace.experts)
    assert np.array_equal(got.weights, trace.weights.astype(got.weights.dtype))  # forced exactly, in the model's dtype
    with pytest.raises(TraceError, match="ran out of trace"):
        moeinfer.generate(model, [[1]], max_new_tokens=2)
    restore_routing_(model)
    assert type(model.moe_blocks()[0].gate).__name__ == "Router"
    cursor = replay_routing_(model, trace, wrap=True)
    moeinfer.generate(model, [[1, 2, 3, 4, 5]], max_new_tokens=10)
    assert cursor.next == 14 % 12


def test_trace_shape_mismatch_is_a_clear_error():
    model = random_mixtral()
    with pytest.raises(TraceError, match="4 MoE layers x 8 experts, top-2; the model 3 MoE layers x 8 experts"):
        replay_routing_(model, random_trace(4, layers=4))
    with pytest.raises(TraceError, match="16 experts"):
        replay_routing_(model, random_trace(4, experts=16))


def test_real_mixtral_routing_on_a_random_model_matches_the_simulator():
    from moeinfer.traces.convert import convert_mixtral

    full = convert_mixtral(MIXTRAL)
    assert (full.num_tokens, full.num_layers, full.num_experts) == (32, 32, 8)
    rows = np.flatnonzero(full.seq == full.seq[0])[:16]  # one sequence, decoded one token per step
    trace = RoutingTrace(experts=full.experts[rows], weights=full.weights[rows], seq=full.seq[rows],
                         pos=full.pos[rows], is_prompt=full.is_prompt[rows], layers=full.layers, num_experts=8)
    model = random_mixtral(layers=32, hidden=16, inter=16, vocab=64)  # Mixtral's routing shape, tiny weights
    cfg = {"cache": 4, "scope": "layer", "policy": "lru", "prefetch": "transition", "calibration": full}
    offload_(model, OffloadConfig(tier="cpu", **cfg))
    replay_routing_(model, trace)
    moeinfer.generate(model, [[1]], max_new_tokens=len(rows))
    live = model.offload.cache.stats
    sim = simulate(trace, shape=ModelShape.from_model(random_mixtral(layers=32, hidden=16, inter=16, vocab=64)),
                   config=OffloadConfig(tier="cpu", **cfg), hardware=load_profile("h100-pcie5"))
    assert live.visits == 32 * len(rows)
    assert (sim.cache["hits"], sim.cache["misses"], sim.cache["prefetch_loads"]) == (
        live.hits, live.misses, live.prefetch_loads)
    model.offload.close()


def test_replaying_a_models_own_routing_is_exact():
    """Replay substitutes the router's output: fed the routing the model itself chose, the run's logits are
    bit-identical (a replay that perturbed weights or experts would show here, not only in the tokens)."""
    model = random_mixtral()
    with record_routing(model, logits=False) as rec:
        tokens, logits = generate_with_logits(model, [3, 17, 99, 42], 8)
    replayed = random_mixtral()
    replay_routing_(replayed, rec.trace())
    again_tokens, again = generate_with_logits(replayed, [3, 17, 99, 42], 8)
    assert again_tokens == tokens
    assert torch.equal(again, logits)


def test_host_time_per_layer_visit_is_charged_once_per_visit():
    """A profile's host_us_per_layer adds exactly (visits x host time) to an on-demand run without
    overlap (the clock is additive there), and changes no cache decision; a negative one is refused."""
    import dataclasses

    from moeinfer.traces.convert import convert_mixtral

    full = convert_mixtral(MIXTRAL)
    rows = np.flatnonzero(full.seq == full.seq[0])[:8]
    trace = RoutingTrace(experts=full.experts[rows], weights=full.weights[rows], seq=full.seq[rows],
                         pos=full.pos[rows], is_prompt=full.is_prompt[rows], layers=full.layers, num_experts=8)
    shape = ModelShape.from_model(random_mixtral(layers=32, hidden=16, inter=16, vocab=64))
    cfg = OffloadConfig(tier="cpu", cache=4, scope="global", policy="lru", prefetch="none")
    hw = load_profile("h100-pcie5")
    base = simulate(trace, shape=shape, config=cfg, hardware=hw, overlap=False)
    slow = simulate(trace, shape=shape, config=cfg, hardware=dataclasses.replace(hw, host_us_per_layer=250.0),
                    overlap=False)
    assert slow.cache == base.cache
    assert slow.time_s - base.time_s == pytest.approx(32 * len(rows) * 250e-6, rel=1e-9)
    with pytest.raises(ValueError, match="host_us_per_layer"):
        dataclasses.replace(hw, host_us_per_layer=-1.0)


def test_a_prompt_step_pays_the_prompt_host_time_and_latency():
    """A step holding prompt rows pays `prompt_host_us_per_layer` per visit and `prompt_link_latency_us`
    per load where the profile has them (decode steps the decode figures): exactly those differences
    on an on-demand run without overlap, and no cache decision changes."""
    import dataclasses

    from moeinfer.traces.convert import convert_mixtral

    full = convert_mixtral(MIXTRAL)
    rows = np.flatnonzero(full.seq == full.seq[0])[:8]
    step = np.array([0, 0, 0, 0, 1, 2, 3, 4])  # a 4-row prompt, then 4 decode steps

    def cut(n: int) -> RoutingTrace:
        r = rows[:n]
        return RoutingTrace(experts=full.experts[r], weights=full.weights[r], seq=full.seq[r], pos=full.pos[r],
                            is_prompt=full.is_prompt[r], layers=full.layers, num_experts=8, step=step[:n])
    shape = ModelShape.from_model(random_mixtral(layers=32, hidden=16, inter=16, vocab=64))
    cfg = OffloadConfig(tier="cpu", cache=4, scope="global", policy="lru", prefetch="none")
    hw = dataclasses.replace(load_profile("h100-pcie5"), host_us_per_layer=250.0, link_latency_us=20.0)
    base = simulate(cut(8), shape=shape, config=cfg, hardware=hw, overlap=False)
    host = simulate(cut(8), shape=shape, config=cfg, overlap=False,
                    hardware=dataclasses.replace(hw, prompt_host_us_per_layer=400.0))
    assert host.cache == base.cache
    assert host.time_s - base.time_s == pytest.approx(32 * (400e-6 - 250e-6), rel=1e-9)  # one prompt step
    lat = simulate(cut(8), shape=shape, config=cfg, overlap=False,
                   hardware=dataclasses.replace(hw, prompt_link_latency_us=120.0))
    prompt_loads = simulate(cut(4), shape=shape, config=cfg, hardware=hw, overlap=False).cache["demand_loads"]
    assert prompt_loads > 0 and lat.cache == base.cache
    assert lat.time_s - base.time_s == pytest.approx(prompt_loads * (120e-6 - 20e-6), rel=1e-9)
