"""The planner's probe of the machine's speed on a model's shape (moeinfer/planning/speed_probe.py): with
this machine's profile holding the shape's costs, `plan` scales its prefill predictions by the profile's
fit for the probe's prompt over its time now, its decode predictions by the profile's decode step over
the probe's; rankings and memory are unchanged; another machine's profile, a profile without the shape's
costs, or probe=False: no probe. Times are scripted (tests never time)."""

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
    plain, none = _plan(monkeypatch, _profile(), probe=False)
    fast, calls = _plan(monkeypatch, _profile())
    assert none == [] and len(calls) == 1
    costs, config, dtype, device = calls[0]
    assert costs == COSTS and config.hidden_size == config_of("tiny").hidden_size and device == "cpu"
    assert dtype == "bfloat16"
    for a, b in zip((plain, *plain.runners_up), (fast, *fast.runners_up)):
        assert a.describe() == b.describe()  # the same plans in the same order
        p, q = a.predicted, b.predicted
        assert q.decode_tok_s == pytest.approx(0.8 * p.decode_tok_s)
        assert q.prefill_tok_s == pytest.approx(1.5 * p.prefill_tok_s)
        assert q.step_ms == pytest.approx(p.step_ms / 0.8)
        assert (q.memory_bytes, q.quality_loss, q.hit_rate) == (p.memory_bytes, p.quality_loss, p.hit_rate)
        assert (p.machine_speed, p.machine_decode_speed) == (1.0, 1.0)
        assert (q.machine_speed, q.machine_decode_speed) == (1.5, 0.8)
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


def test_the_speeds_are_the_profiles_figures_over_the_probes(monkeypatch):
    calls = _scripted(monkeypatch)
    monkeypatch.setattr(speed_probe, "LEAST_S", 0.0)
    fit = COSTS.layer_s + 31 * COSTS.layer_token_s + COSTS.forward_s + 31 * COSTS.forward_token_s
    assert COSTS.reference_seconds() == pytest.approx(fit)
    config = config_of("tiny")
    costs = replace(COSTS, after_decode=1.25)
    got = speed_probe.machine_speed(costs, config, "bfloat16", "cpu")
    # prompts: the fit's price of the probe's prompt (after decode steps: x after_decode) over its time now
    assert (got.prompt, got.decode) == pytest.approx((1.25 * fit / 1e-3, 4e-4 / 5e-4))
    # a warm-up round, then REPEATS rounds, each a prompt of the shorter measured length right after decode steps
    assert len(calls) == 2 * (speed_probe.REPEATS + 1)
    assert [c[0] for c in calls] == ["decode", "prompt"] * (speed_probe.REPEATS + 1)
    assert {c[2] for c in calls if c[0] == "prompt"} == {32}
    model = calls[0][1]
    assert {c[1] for c in calls} == {model}  # one model throughout
    # the shape's 1-layer model, experts stubbed (shape_costs step 1)
    assert len(model.moe_blocks()) == 1 and model.config.hidden_size == config.hidden_size
    assert type(model.moe_blocks()[0].experts).__name__ == "_NoExperts"
    # a profile without a decode figure (older shape costs): the prompt speed for both
    old = speed_probe.machine_speed(replace(COSTS, decode_reference_s=0.0), config, "bfloat16", "cpu")
    assert old.decode == old.prompt == pytest.approx(fit / 1e-3)


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
