"""The profile's fixed costs (moeinfer/planning/profile.py, step 3): decode steps (token gaps of a
greedy generation through the KV cache) of 1- and 3-layer models with their experts on the kernel
whose expert stage is subtracted, and that kernel is the native 'cpu' one where the planned model
runs natively (its small, closely priced expert stage leaves the layer's own overhead)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moeinfer.planning import profile, shape_costs
from moeinfer.planning.profile import ExpertRate


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
def test_fixed_costs_are_timed_on_the_kernel_they_subtract(monkeypatch, kernel):
    seen = []

    def fake_gaps(models, repeats, tokens=16):
        seen.extend(models)
        return [0.002, 0.005], [0.0, 0.0]  # 1 layer, 3 layers

    monkeypatch.setattr(profile, "decode_gaps_in_turn", fake_gaps)
    rate = ExpertRate(call_s=1e-4, expert_fixed_s=2e-5, bytes_per_s=1e10, flops_per_s=1e10)
    layer, step = profile.measure_fixed(torch.device("cpu"), rate, top_k=2, kernel=kernel)
    assert [len(m.moe_blocks()) for m in seen] == [1, 3]
    assert all(b.experts.kernel == kernel for m in seen for b in m.moe_blocks())
    assert layer == pytest.approx(0.0015 - 1e-4 - 2 * 2e-5)  # per layer, less the expert stage
    assert step == pytest.approx(0.002 - 0.0015)


def test_measure_takes_the_cpu_kernel_where_the_dense_path_is_native(monkeypatch):
    calls = []

    def fake_fixed(device, rate, top_k=2, repeats=7, kernel="reference"):
        calls.append((kernel, rate))
        raise StopIteration  # the rest of the profile is not under test

    rates = {v: ExpertRate(call_s=i * 1e-4, expert_fixed_s=0.0, bytes_per_s=1e10, flops_per_s=1e10)
             for i, v in enumerate(("bf16/reference", "bf16/cpu"), start=1)}
    monkeypatch.setattr(profile, "_link_gbps", lambda dev: ("disk", 1.0, 10.0, 100.0))
    monkeypatch.setattr(profile, "cached_read_gbps", lambda: 5.0)
    monkeypatch.setattr(profile, "default_variants", lambda device: tuple(rates))
    monkeypatch.setattr(profile, "measure_variant", lambda v, dev, **kw: rates[v])
    monkeypatch.setattr(profile, "measure_fixed", fake_fixed)
    for native, kernel in ((True, "cpu"), (False, "reference")):
        monkeypatch.setattr(profile, "native_dense", lambda dev, native=native: native)
        with pytest.raises(StopIteration):
            profile.measure("cpu")
        assert calls[-1] == (kernel, rates[f"bf16/{kernel}"])


def test_decode_gaps_time_generation_steps(monkeypatch):
    """The real helper runs greedy generations of `tokens` tokens per model per round (plus a warm-up
    round) and returns one finite figure per model (no timing is asserted)."""
    runs = []
    real = shape_costs.generate

    def counting_generate(model, prompts, **kw):
        runs.append((id(model), kw["max_new_tokens"]))
        return real(model, prompts, **kw)

    monkeypatch.setattr(shape_costs, "generate", counting_generate)
    models = [profile._tiny_model(layers, torch.device("cpu")) for layers in (1, 3)]
    gaps, _ = profile.decode_gaps_in_turn(models, repeats=2, tokens=6)
    assert len(gaps) == 2 and all(0 < g < float("inf") for g in gaps)
    assert runs == [(id(m), 6) for _ in range(3) for m in models]


def test_decode_gaps_count_a_counter_per_step():
    """`count`: its median change between consecutive tokens is returned after the times, per model."""
    models = [profile._tiny_model(1, torch.device("cpu"))]
    reads = {"n": 0}

    def count(model):
        reads["n"] += 3  # three a token
        return reads["n"]
    times, per_step = profile.decode_gaps_in_turn(models, repeats=1, tokens=5, count=count)
    assert len(times) == 1 and 0 < times[0] < float("inf") and per_step == [3]


def test_random_models_are_frozen_as_loaded_ones():
    """Modules prepare their one-row call only for grad-free weights (moeinfer.engine.cpu_decode): the
    profile's random models must take the path a loaded checkpoint takes."""
    m = profile._tiny_model(1, torch.device("cpu"))
    assert not any(p.requires_grad for p in m.parameters())


def test_offload_costs_come_from_decode_steps_and_prompts(monkeypatch):
    """measure_offload: resident, all-hits and all-misses models timed by decode steps in turn (a cache of
    every expert, and one of top-k slots), then by prompts (a cache of every expert, and one of 4 global
    LRU slots: one layer's experts, each visit loading all of them into slots); the visit cost is per
    layer, the load latency per load counted in a step or a prompt, less the bytes' link time."""
    seen, prompts = [], []

    def fake_gaps(models, repeats, tokens=16, count=None):
        seen.extend(models)
        assert count is not None
        return [0.001, 0.004, 0.010], [0.0, 0.0, 6.0]  # times; loads per step

    def fake_prompts(models, repeats, count):
        prompts.extend(models)
        assert count(models[2]) == float(models[2].offload.cache.stats.demand_loads)
        return [0.002, 0.005, 0.029], 12.0  # times; loads per prompt

    monkeypatch.setattr(profile, "decode_gaps_in_turn", fake_gaps)
    monkeypatch.setattr(profile, "prompt_loads_in_turn", fake_prompts)
    got = profile.measure_offload(torch.device("cpu"), link_gbps=2.0, precision="int4")
    assert [getattr(m, "offload", None) is None for m in seen] == [True, False, False]
    assert [m.offload.cache.num_slots for m in seen[1:]] == [12, 2]
    assert prompts[0] is seen[0] and [m.offload.cache.num_slots for m in prompts[1:]] == [12, 4]
    assert prompts[2].offload.config.policy == "lru" and prompts[2].offload.config.scope == "global"
    nbytes = profile.stored_expert_bytes("int4", 64, 64)
    assert got.layer_s == pytest.approx(0.001)
    assert got.load_latency_s == pytest.approx(0.001 - nbytes / 2e9)
    assert got.prompt_layer_s == pytest.approx(0.001)
    assert got.prompt_load_s == pytest.approx(0.002 - nbytes / 2e9)


def test_offload_costs_of_another_model_size_their_caches_by_its_layers_and_experts(monkeypatch):
    """`base` (the planned model's shape, shape_profile step 5): the caches hold all of its L x E experts,
    its top-k, or one layer's E; a load's bytes are `expert_bytes`; every model is a fresh `base()`."""
    from moeinfer.planning.shape_costs import random_model
    from moeinfer.planning.sizes import config_of

    tiny = config_of("tiny")
    config = replace(tiny, router=replace(tiny.router, num_experts=6, top_k=3))
    built, seen, prompts = [], [], []

    def base():
        m = random_model(config, 2, torch.bfloat16, torch.device("cpu"))
        for block in m.moe_blocks():
            block.experts = profile.experts_module("bf16/reference", 6, config.hidden_size,
                                                   config.moe_intermediate_size, torch.device("cpu"))
        built.append(m)
        return m

    monkeypatch.setattr(profile, "decode_gaps_in_turn",
                        lambda models, repeats, tokens=16, count=None: seen.extend(models) or ([0.001, 0.003, 0.009],
                                                                                               [0.0, 0.0, 6.0]))
    monkeypatch.setattr(profile, "prompt_loads_in_turn",
                        lambda models, repeats, count: prompts.extend(models) or ([0.002, 0.004, 0.016], 12.0))
    got = profile.measure_offload(torch.device("cpu"), link_gbps=4.0, precision="int8", base=base, expert_bytes=4e5)
    assert len(built) == 5 and all(m in built for m in seen + prompts)
    assert [m.offload.cache.num_slots for m in seen[1:]] == [12, 3]
    assert [m.offload.cache.num_slots for m in prompts[1:]] == [12, 6]
    assert all(type(b.experts).__name__ == "QuantizedExperts" for b in seen[0].moe_blocks())  # at the precision
    assert got.layer_s == pytest.approx(0.001) and got.prompt_layer_s == pytest.approx(0.001)
    assert got.load_latency_s == pytest.approx(0.001 - 4e5 / 4e9)
    assert got.prompt_load_s == pytest.approx(0.001 - 4e5 / 4e9)


def test_prompt_loads_are_counted_per_forward_and_priced_against_the_resident_model(monkeypatch):
    from moeinfer.planning import shape_costs

    class Model:
        def __init__(self, loads_per_forward):
            self.loads, self.per = 0, loads_per_forward

    times = iter([9.0, 9.0, 9.0] + [1.0, 2.0, 4.0] + [2.0, 4.0, 8.0] + [1.5, 3.0, 6.0])  # a warm-up round first

    def fake_prefill(m, ids):
        assert ids.shape == (1, profile.PROMPT_TOKENS)
        m.loads += m.per
        return next(times)

    monkeypatch.setattr(profile, "prefill_seconds", fake_prefill)
    models = [Model(0), Model(0), Model(5)]
    got, loads = profile.prompt_loads_in_turn(models, 3, lambda m: m.loads)
    assert got == pytest.approx([1.5, 3.0, 6.0]) and loads == 5


def test_the_simulator_charges_a_prompts_visits_and_loads_the_prompt_figures():
    """A step holding prompt rows pays the profile's prompt host time per visit and latency per load;
    decode steps the decode figures; a profile without prompt figures charges prompts the decode ones."""
    from dataclasses import replace

    from moeinfer.offload.hardware import HardwareProfile

    hw = HardwareProfile(name="t", link_gbps=1.0, fast_mem_gbps=1.0, compute_tflops=1.0,
                         link_latency_us=50.0, host_us_per_layer=100.0)
    assert (hw.host_s(True), hw.latency_s(True)) == pytest.approx((1e-4, 5e-5))
    hw = replace(hw, prompt_host_us_per_layer=300.0, prompt_link_latency_us=150.0)
    assert (hw.host_s(False), hw.latency_s(False)) == pytest.approx((1e-4, 5e-5))
    assert (hw.host_s(True), hw.latency_s(True)) == pytest.approx((3e-4, 1.5e-4))
    with pytest.raises(ValueError, match="prompt_host_us_per_layer"):
        replace(hw, prompt_host_us_per_layer=-1.0)


# --- prefill's per-token costs (profile version 10) ---

def test_the_prefill_fit_separates_the_matmul_rate_from_the_per_token_cost():
    call, fixed, slot, rate = 5e-5, 2e-6, 3e-6, 4e10
    small, large, N, K, E = (128, 128), (768, 768), 64, 2, 8

    def time_at(D, I):  # what the fit assumes: call + fixed per expert + flops + per-slot beyond the first
        return call + E * fixed + 6.0 * D * I * N * K / rate + (N * K - E) * slot

    got_rate, got_slot = profile.fit_prefill(time_at(*small), time_at(*large), small=small, large=large, tokens=N,
                                             top_k=K, experts=E, call_s=call, expert_fixed_s=fixed)
    assert got_rate == pytest.approx(rate) and got_slot == pytest.approx(slot)
    # noise: the large size measured no slower: everything priced as flops, no per-token cost
    r, s = profile.fit_prefill(1e-3, 9e-4, small=small, large=large, tokens=N, top_k=K, experts=E, call_s=call,
                               expert_fixed_s=fixed)
    assert s == 0.0 and r == pytest.approx(6.0 * 768 * 768 * N * K / (9e-4 - call - E * fixed))


def test_per_token_costs_are_charged_beyond_the_first_token_only():
    rate = ExpertRate(call_s=1e-4, expert_fixed_s=2e-5, bytes_per_s=1e10, flops_per_s=1e12, slot_s=1e-6)
    one = rate.expert_s(1e6, 6e6)
    assert one == pytest.approx(2e-5 + 1e6 / 1e10)  # decode: as before the per-token cost existed
    assert rate.expert_s(1e6, 6e6 * 16, tokens=16) == pytest.approx(2e-5 + max(1e-4, 96e6 / 1e12) + 15e-6)


def test_prefill_token_cost_is_the_layers_difference_less_experts_and_one_token(monkeypatch):
    seen = []

    def fake_prefill(models, repeats, tokens):
        seen.extend((len(m.moe_blocks()), tokens) for m in models)
        return [0.004, 0.010]  # 1 layer, 3 layers: 3 ms a layer

    monkeypatch.setattr(profile, "prefill_in_turn", fake_prefill)
    rate = ExpertRate(call_s=1e-4, expert_fixed_s=1e-5, bytes_per_s=1e10, flops_per_s=1e15, slot_s=2e-6)
    got = profile.measure_prefill_tokens(torch.device("cpu"), rate, layer_fixed=2e-4, tokens=64)
    assert seen == [(1, 64), (3, 64)]
    # the tiny models: 4 experts, top-2: 128 token-slots, 32 an expert
    experts = 1e-4 + 4 * (1e-5 + 6.0 * 64 * 64 * 32 / 1e15 + 31 * 2e-6)
    assert got == pytest.approx((0.003 - experts - 2e-4) / 63)


def test_prefill_forwards_are_timed_through_a_cache():
    models = [profile._tiny_model(layers, torch.device("cpu")) for layers in (1, 3)]
    times = profile.prefill_in_turn(models, repeats=1, tokens=8)
    assert len(times) == 2 and all(0 < t < float("inf") for t in times)


def test_models_timed_in_turn_are_priced_against_the_first(monkeypatch):
    """decode_gaps_in_turn and prefill_in_turn: the first model's median time x each model's median ratio to
    it in the same rounds (moeinfer/planning/in_turn.py); a drifting machine and one model's one-off fast
    run leave the difference between the models as the rounds show it (scripted times)."""
    from moeinfer.planning import shape_costs

    rounds = [[1e-3, 3e-3], [2e-3, 6e-3], [1.5e-3, 1.2e-3], [1.2e-3, 3.6e-3]]  # round 3: model 2 alone fast
    monkeypatch.setattr(profile, "decode_gap_rounds", lambda models, repeats, tokens, count: (rounds, [0.0, 0.0]))
    gaps, _ = profile.decode_gaps_in_turn([object(), object()], repeats=4)
    # the first's median 1.35e-3, the ratio's median 3 (each the least of its rounds: 1e-3 and 1.2e-3)
    assert gaps == pytest.approx([1.35e-3, 4.05e-3])
    times = iter([9.0, 9.0] + [t for row in rounds for t in row])  # a warm-up round first
    monkeypatch.setattr(shape_costs, "prefill_seconds", lambda model, ids: next(times))
    assert shape_costs.prefill_in_turn([object(), object()], 4, 8) == pytest.approx([1.35e-3, 4.05e-3])


def test_a_decode_round_is_the_generations_mean_step_and_mean_loads(monkeypatch):
    """decode_gap_rounds: per round and model, the mean time between a generation's tokens (its decode
    tokens/s, slow steps included: the median step would read 1 ms here, not 2) and the mean loads a step
    of the last round; the warm-up round left out."""
    # per generation: the warm-up round's (a, b), then the round's (a, b)
    gaps = iter([[9.0, 9.0, 9.0], [9.0, 9.0, 9.0], [1e-3, 1e-3, 4e-3], [2e-3, 2e-3, 8e-3]])
    loads = iter([[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 2, 6], [0, 2, 4, 12]])  # loads so far, at every token

    def fake_stamps(model, tokens, count=None):
        g, n = next(gaps), next(loads)
        stamps = [0.0, 5.0]  # the prompt's forward and the first step are not counted
        for x in g:
            stamps.append(stamps[-1] + x)
        return stamps, ([0.0] + n if count is not None else [])

    monkeypatch.setattr(profile, "token_stamps", fake_stamps)
    rounds, per_step = profile.decode_gap_rounds(["a", "b"], 1, count=lambda m: 0.0)
    assert rounds == [pytest.approx([2e-3, 4e-3])]
    assert per_step == pytest.approx([2.0, 4.0])
