"""The planner's probe of the machine's speed on a model's shape (moeinfer/planning/speed_probe.py): with
this machine's profile holding the shape's costs, `plan` scales its prefill predictions by the cost
model's price of the probe's prompt over its time now, its decode predictions by the price of the probe's
decode step over its time; the probe's model carries one layer of the shape's experts at the first
quantized variant the shape's costs measured (stubbed where none); rankings and memory are unchanged;
another machine's profile, a profile without the shape's costs, or probe=False: no probe. Times are
scripted (tests never time)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from plan_helpers import synthetic_profile, toy_quality

from moeinfer.planning import planner, speed_probe
from moeinfer.planning.shape_costs import ShapeCosts
from moeinfer.planning.sizes import config_of, sizes_from_checkpoint

COSTS = ShapeCosts(layer_s=3e-4, layer_token_s=2e-6, forward_s=5e-4, forward_token_s=1e-6, tokens=(32, 256),
                   decode_reference_s=4e-4)


def _profile(key: str = "this-machine"):
    return replace(synthetic_profile(), key=key, shapes={sizes_from_checkpoint("tiny").shape_key: COSTS})


def _plan(monkeypatch, profile, *, probe: bool = True, speed=speed_probe.MachineSpeed(prompt=1.5, decode=0.8)):
    monkeypatch.setattr(planner, "machine_key", lambda device: "this-machine")
    calls = []
    monkeypatch.setattr(planner, "machine_speed", lambda *a: calls.append(a) or speed)
    plan = planner.plan("tiny", "100MB", quality=toy_quality(4), precisions=("bf16", "int4"), profile=profile,
                        probe=probe)
    return plan, calls


def test_predictions_are_scaled_by_the_probed_speed(monkeypatch):
    """Resident plans: every rate times the probed speed. Offloaded ones: their compute runs at it, their
    loads' transfers do not (moeinfer.planning.costs.simulate_plan, tested exactly in
    test_plan_simulate_at_speed.py): decode at 0.8x compute lands between 0.8x and 1x."""
    plain, none = _plan(monkeypatch, _profile(), probe=False)
    fast, calls = _plan(monkeypatch, _profile())
    assert none == [] and len(calls) == 1
    profile, sizes, config, device = calls[0]
    assert profile.shapes[sizes.shape_key] == COSTS and sizes == sizes_from_checkpoint("tiny")
    assert config.hidden_size == config_of("tiny").hidden_size and device == "cpu"
    kinds = set()
    for a, b in zip((plain, *plain.runners_up), (fast, *fast.runners_up)):
        assert a.describe() == b.describe()  # the same plans in the same order
        p, q = a.predicted, b.predicted
        kinds.add(a.offload is None)
        if a.offload is None:
            assert q.decode_tok_s == pytest.approx(0.8 * p.decode_tok_s)
            assert q.prefill_tok_s == pytest.approx(1.5 * p.prefill_tok_s)
            assert q.step_ms == pytest.approx(p.step_ms / 0.8)
        else:
            assert 0.8 * p.decode_tok_s < q.decode_tok_s < p.decode_tok_s
            assert p.prefill_tok_s < q.prefill_tok_s < 1.5 * p.prefill_tok_s
            assert q.step_ms == pytest.approx(1e3 / q.decode_tok_s)
        assert (q.memory_bytes, q.quality_loss, q.hit_rate) == (p.memory_bytes, p.quality_loss, p.hit_rate)
        assert (p.machine_speed, p.machine_decode_speed) == (1.0, 1.0)
        assert (q.machine_speed, q.machine_decode_speed) == (1.5, 0.8)
    assert kinds == {True, False}  # both kinds of plan among the four
    assert any("1.50x its profile's speed on prompts and 0.80x on decode steps" in n for n in fast.notes)


@pytest.mark.parametrize("profile", [_profile("another-machine"), replace(_profile(), shapes={})],
                         ids=["another machine's profile", "no costs for the shape"])
def test_no_probe_without_this_machines_costs_for_the_shape(profile, monkeypatch):
    plan, calls = _plan(monkeypatch, profile)
    assert calls == [] and plan.predicted.machine_speed == 1.0


def _scripted(monkeypatch, prompt_s: float = 1e-3, decode_s: float = 5e-4):
    """The probe's model calls scripted: a generation's mean decode step takes `decode_s`, prompts
    `prompt_s`; the warm-up round 100x both. Returns the calls in order."""
    calls = []

    def steps(model, steps=16):
        calls.append(("decode", model))
        return (100 if len(calls) == 1 else 1) * decode_s

    def prompt(model, ids):
        calls.append(("prompt", model, ids.shape[1]))
        return (100 if len(calls) == 2 else 1) * prompt_s

    monkeypatch.setattr(speed_probe, "mean_step", steps)
    monkeypatch.setattr(speed_probe, "prefill_seconds", prompt)
    return calls


def _machine_speed(costs: ShapeCosts):
    sizes = sizes_from_checkpoint("tiny")
    profile = replace(synthetic_profile(), shapes={sizes.shape_key: costs})
    return speed_probe.machine_speed(profile, sizes, config_of("tiny"), "cpu")


def test_without_measured_quantized_experts_the_stubbed_shape_is_priced_by_its_own_figures(monkeypatch):
    calls = _scripted(monkeypatch)
    monkeypatch.setattr(speed_probe, "LEAST_S", 0.0)
    fit = COSTS.layer_s + 31 * COSTS.layer_token_s + COSTS.forward_s + 31 * COSTS.forward_token_s
    assert COSTS.reference_seconds() == pytest.approx(fit)
    got = _machine_speed(replace(COSTS, after_decode=1.25, experts={"bf16/cpu": (1e-4, 1e-6)}))
    # prompts: the fit's price of the probe's prompt (after decode steps: x after_decode) over its time now
    assert (got.prompt, got.decode) == pytest.approx((1.25 * fit / 1e-3, 4e-4 / 5e-4))
    # a warm-up round, then REPEATS rounds, each a prompt of the shorter measured length right after decode steps
    assert len(calls) == 2 * (speed_probe.REPEATS + 1)
    assert [c[0] for c in calls] == ["decode", "prompt"] * (speed_probe.REPEATS + 1)
    assert {c[2] for c in calls if c[0] == "prompt"} == {32}
    model = calls[0][1]
    assert {c[1] for c in calls} == {model}  # one model throughout
    # the shape's 1-layer model, experts stubbed (shape_costs step 1)
    assert len(model.moe_blocks()) == 1 and model.config.hidden_size == config_of("tiny").hidden_size
    assert type(model.moe_blocks()[0].experts).__name__ == "_NoExperts"
    # a profile without a decode figure (older shape costs): the prompt speed for both
    old = _machine_speed(replace(COSTS, decode_reference_s=0.0))
    assert old.decode == old.prompt == pytest.approx(fit / 1e-3)


@pytest.mark.parametrize("measured", [("int4",), ("int8", "int4"), ("int8",)])
def test_the_probe_carries_the_shapes_quantized_experts_priced_by_the_cost_model(measured, monkeypatch):
    """The probe's prompt model: one layer of the shape's experts at the first of int4, int8 the shape's
    costs measured, its prompt priced by the cost model (its router's tokens per expert on the shape's
    line); its decode steps run before each prompt, the stubbed model's after it give the decode speed."""
    calls = _scripted(monkeypatch, prompt_s=2e-3, decode_s=1e-3)
    monkeypatch.setattr(speed_probe, "LEAST_S", 0.0)
    lines = {"int4": (3e-5, 2e-6), "int8": (5e-5, 4e-6)}
    costs = replace(COSTS, experts={v: lines[v] for v in measured} | {"bf16/cpu": (1e-4, 1e-6)})
    got = _machine_speed(costs)
    variant = "int4" if "int4" in measured else "int8"
    model = calls[0][1]
    experts = model.moe_blocks()[0].experts
    config = config_of("tiny")
    assert type(experts).__name__ == "QuantizedExperts" and set(experts.bits) == {4 if variant == "int4" else 8}
    assert (experts.num_experts, experts.hidden_size, experts.intermediate_size) == (
        config.num_experts, config.hidden_size, config.moe_intermediate_size)
    # the prompt: dense part and head as measured on the shape, call_s once, each routed expert on its line
    routed = speed_probe.routed_tokens(model, 32)
    assert sum(routed) == 32 * config.top_k and all(t > 0 for t in routed)
    per_expert, per_token = lines[variant]
    rate = synthetic_profile().experts[variant]
    prompt = (costs.layer(32) + rate.call_s + len(routed) * per_expert + 32 * config.top_k * per_token
              + costs.forward(32))
    assert got.prompt == pytest.approx(prompt / 2e-3)
    # decode: the stubbed model's steps after each prompt, priced by the shape's decode step (one layer of
    # experts partly stays in the last-level cache between decode steps: not the streamed price)
    stub = calls[2][1]
    assert type(stub.moe_blocks()[0].experts).__name__ == "_NoExperts"
    assert [(c[0], c[1]) for c in calls] == [("decode", model), ("prompt", model), ("decode", stub)] * (
        speed_probe.REPEATS + 1)
    assert got.decode == pytest.approx(costs.decode_reference_s / 1e-3)


def test_the_probe_runs_for_at_least_its_seconds_and_at_most_its_rounds(monkeypatch):
    calls = _scripted(monkeypatch)
    now = [0.0]

    def clock():  # each reading 0.25 s later
        now[0] += 0.25
        return now[0]

    speed_probe.probe_seconds(object(), 32, repeats=3, least_s=1.0, clock=clock)
    rounds = sum(c[0] == "prompt" for c in calls) - 1  # less the warm-up round
    assert rounds == 6  # 3 rounds took 0.25 s of the clock, the 6th ended at 1 s
    calls.clear()
    now[0] = 0.0
    speed_probe.probe_seconds(object(), 32, repeats=3, least_s=1e9, clock=clock)
    assert sum(c[0] == "prompt" for c in calls) - 1 == speed_probe.MAX_REPEATS


def test_the_warm_up_round_takes_no_part_in_the_medians(monkeypatch):
    prompts = iter([0.0, 1.0, 2.0, 3.0])  # the warm-up round's prompt first
    steps = iter([0.0, 1.0, 2.0, 3.0])
    monkeypatch.setattr(speed_probe, "mean_step", lambda model, steps_: next(steps))
    monkeypatch.setattr(speed_probe, "prefill_seconds", lambda model, ids: next(prompts))
    assert speed_probe.probe_seconds(object(), 32, repeats=3, least_s=0.0) == (2.0, 2.0)  # with it: 1.5, 1.5
