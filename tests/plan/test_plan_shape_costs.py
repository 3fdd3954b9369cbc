"""Prompt costs measured on the planned model's own shapes (moeinfer/planning/shape_costs.py and
shape_profile.py): the fits, the random models they time, the cache beside the machine profile, and
how the cost model prices a prompt with them (timings are synthetic: tests never time anything)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from plan_helpers import synthetic_profile

from moeinfer.offload.config import OffloadConfig
from moeinfer.offload.visits import planned_steps
from moeinfer.planning import shape_costs, shape_profile
from moeinfer.planning import routing as routes
from moeinfer.planning.costs import MeasuredCosts, layer_seconds, simulate_plan
from moeinfer.planning.shape_costs import ShapeCosts, fit_line, shape_key
from moeinfer.planning.profile import MachineProfile
from moeinfer.planning.sizes import config_of, sizes_from_checkpoint
from moeinfer.planning.spec import PlanOffload

COSTS = ShapeCosts(layer_s=3e-4, layer_token_s=2e-6, forward_s=5e-4, forward_token_s=1e-6,
                   experts={"bf16/reference": (4e-5, 1e-6), "int4": (2e-5, 3e-6)},
                   offloaded={"int4": (1e-4, 3e-6), "bf16/reference": (2e-4, 2e-6)}, decode_experts={"int4": 9e-5})


def _shaped(prof: MachineProfile, costs: ShapeCosts = COSTS) -> MachineProfile:
    return replace(prof, shapes={sizes_from_checkpoint("tiny").shape_key: costs})


def test_fit_line_recovers_a_line_and_keeps_both_terms_non_negative():
    assert fit_line((32, 256), (1e-3 + 31 * 2e-6, 1e-3 + 255 * 2e-6)) == pytest.approx((1e-3, 2e-6))
    # the longer prompt measured faster (noise): no per-token cost, the shorter one's time per forward
    assert fit_line((32, 256), (2e-3, 1e-3)) == pytest.approx((2e-3, 0.0))
    # a negative intercept: all of it per token
    assert fit_line((32, 256), (1e-4, 1e-2)) == pytest.approx((0.0, 1e-4 / 31))


def test_prefill_costs_are_the_layers_difference_and_the_rest_per_forward(monkeypatch):
    """Both models at both lengths in turn each round, priced against the 1-layer model's shorter prompt:
    the machine's speed drifting from round to round and one call's one-off fast run leave the fit
    on the truth at the median round's level."""
    seen = []
    drift = [1.3, 0.8, 2.0, 1.6] + [1.0] * (shape_costs.ROUNDS - 3)  # per round (warm-up first)

    def fake(model, ids):
        n, tokens = len(model.moe_blocks()), ids.shape[1]
        seen.append((tokens, n, model))
        r = (len(seen) - 1) // 4
        layer, forward = 1e-4 + (tokens - 1) * 3e-6, 4e-4 + (tokens - 1) * 1e-6
        blip = 0.5 if (r, n, tokens) == (3, 3, 32) else 1.0  # the 3-layer model alone fast once
        return drift[r] * blip * (forward + n * layer)

    monkeypatch.setattr(shape_costs, "prefill_seconds", fake)
    after = []
    monkeypatch.setattr(shape_costs, "after_decode", lambda model, tokens: after.append((model, tokens)) or 1.25)
    decoded = []
    monkeypatch.setattr(shape_costs, "decode_in_turn", lambda models: decoded.append(models) or [3e-4, 7e-4])
    config = config_of("tiny")
    got = shape_costs.measure_shape_costs(config, "bfloat16")
    assert [(t, n) for t, n, _ in seen[:4]] == [(32, 1), (32, 3), (256, 1), (256, 3)]
    assert len(seen) == 4 * (shape_costs.ROUNDS + 1)  # a warm-up round, then the rounds
    assert (got.layer_s, got.layer_token_s) == pytest.approx((1e-4, 3e-6))
    assert (got.forward_s, got.forward_token_s) == pytest.approx((4e-4, 1e-6))
    assert got.reference_seconds() == pytest.approx(5e-4 + 31 * 4e-6)
    # step 4 on the 3-layer model at the shorter prompt scales every prompt cost
    assert len(after) == 1 and after[0][0] is seen[1][2] and after[0][1] == 32
    assert got.after_decode == 1.25
    # step 5: the 1- and 3-layer models' decode steps in turn: per layer half their difference, per step the
    # rest; the 1-layer model's step is what the plan-time probe compares a decode step with
    assert decoded == [[seen[0][2], seen[1][2]]] and got.decode_reference_s == 3e-4
    assert (got.decode_layer_s, got.decode_step_s) == pytest.approx((2e-4, 1e-4))
    assert got.layer(64) == pytest.approx(1.25 * (1e-4 + 63 * 3e-6)) and got.forward(1) == pytest.approx(1.25 * 4e-4)
    # a context shorter than the longer prompt: both lengths fit in it
    short = replace(config, max_position_embeddings=100)
    seen.clear()
    assert shape_costs.measure_shape_costs(short, "bfloat16").tokens == (32, 100)


def test_after_decode_is_the_median_ratio_of_a_prompt_after_decode_steps_to_one_after_itself(monkeypatch):
    """Step 4: each round runs a generation's decode steps, then the prompt twice; the first over the
    second, median of the rounds (warm-up round dropped), at least 1; an experts' cost is scaled alike."""
    calls = []
    monkeypatch.setattr(shape_costs, "decode_steps", lambda model, steps: calls.append(("decode", steps)) or [])
    times = iter([9.0, 1.0] + [3.0, 2.0, 2.0, 2.0, 5.0, 2.0])  # warm-up round, then ratios 1.5, 1.0, 2.5

    def prompt(model, ids):
        calls.append(("prompt", ids.shape[1]))
        return next(times)

    monkeypatch.setattr(shape_costs, "prefill_seconds", prompt)
    assert shape_costs.after_decode(object(), 8, steps=4, rounds=3) == pytest.approx(1.5)
    assert calls == [("decode", 4), ("prompt", 8), ("prompt", 8)] * 4  # each round: the steps, then the prompts
    times = iter([1.0, 1.0] + [1.0, 2.0] * 3)  # a prompt faster after decode steps (noise): 1, not less
    assert shape_costs.after_decode(object(), 8, steps=4, rounds=3) == 1.0
    scaled = replace(COSTS, after_decode=2.0)
    assert scaled.expert("int4", 10) == pytest.approx(2 * COSTS.expert("int4", 10))
    assert scaled.expert("int4", 10, offloaded=True) == pytest.approx(2 * COSTS.expert("int4", 10, offloaded=True))


def test_decode_steps_are_the_gaps_between_a_generations_tokens_the_prompt_and_first_step_not_counted(monkeypatch):
    """Step 5: a greedy generation of steps + 2 tokens; its seconds from a scripted clock (the prompt's
    forward, then each decode step, takes the next duration before its token)."""
    seen = []

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    clock = Clock()

    def fake_generate(model, prompts, *, max_new_tokens, ignore_eos, on_token):
        seen.append((model, prompts, max_new_tokens, ignore_eos))
        for _ in range(max_new_tokens):
            clock.now += next(durations)
            on_token(0, 0, None)

    monkeypatch.setattr(shape_costs.time, "perf_counter", clock)
    monkeypatch.setattr(shape_costs, "generate", fake_generate)
    durations = iter([9.0, 7.0, 1.0, 3.0, 2.0])  # prompt, first step, then the counted steps
    assert shape_costs.decode_steps("model", steps=3) == pytest.approx([1.0, 3.0, 2.0])
    assert seen == [("model", [[1, 2, 3]], 5, True)]


def test_decode_steps_run_on_the_stubbed_shape_model():
    """The generation runs through the model of the shape with its routed experts stubbed."""
    model = shape_costs.random_model(config_of("tiny"), 1, torch.bfloat16, torch.device("cpu"))
    steps = shape_costs.decode_steps(model, steps=3)
    assert len(steps) == 3 and all(t > 0 for t in steps)


def test_decode_steps_in_turn_are_priced_against_the_first_model(monkeypatch):
    """Step 5: per round a generation of each model in turn (its mean step: a generation's slow steps
    count, as in the tokens/s a user meets), priced against the first model's: the machine drifting from
    round to round, or one generation's one-off fast run, leaves the figures on the truth at the median
    round's level."""
    order = []
    drift = [3.0, 0.8, 2.0, 1.6] + [1.0] * (shape_costs.DECODE_ROUNDS - 3)  # per round (warm-up first)

    def steps(model, steps=16):
        order.append(model)
        r = (len(order) - 1) // 2
        blip = 0.5 if (r, model) == (5, "three") else 1.0
        t = {"one": 4e-4, "three": 8e-4}[model]
        return [drift[r] * blip * x * t for x in (0.25, 0.5, 2.25)]  # mean t; the median step would give t / 2

    monkeypatch.setattr(shape_costs, "decode_steps", steps)
    assert shape_costs.decode_in_turn(["one", "three"]) == pytest.approx([4e-4, 8e-4])
    assert order == ["one", "three"] * (shape_costs.DECODE_ROUNDS + 1)


def test_the_timed_models_have_the_planned_shapes_and_no_routed_experts():
    config = config_of("tiny")
    model = shape_costs.random_model(config, 3, torch.bfloat16, torch.device("cpu"))
    ref_attn = config.num_heads * config.head_dim, config.hidden_size
    assert len(model.moe_blocks()) == 3 and model.dtype == torch.bfloat16
    assert tuple(model.layers[0].self_attn.q_proj.weight.shape) == ref_attn
    assert model.lm_head.weight.shape[0] == config.vocab_size
    assert all(isinstance(b.experts, shape_costs._NoExperts) for b in model.moe_blocks())
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.arange(1, 9)[None]
    with torch.inference_mode():
        out = model(ids)
    assert out.shape == (1, 8, config.vocab_size) and torch.isfinite(out.float()).all()


def test_the_shape_key_names_one_layers_shape_and_dtype_not_the_depth():
    config = config_of("tiny")
    key = shape_key(config, "bfloat16")
    assert shape_key(replace(config, num_layers=2, layer_ffn=("moe",) * 2), "bfloat16") == key
    assert shape_key(config, "float32") != key
    assert shape_key(replace(config, num_heads=3, num_kv_heads=1), "bfloat16") != key
    assert sizes_from_checkpoint("tiny").shape_key == key


def test_a_prompt_step_is_priced_with_the_measured_costs_and_a_decode_step_as_before():
    sizes = sizes_from_checkpoint("tiny")
    base = synthetic_profile()
    L = sizes.num_layers
    plain = MeasuredCosts(sizes, base, ["bf16"] * L, kernel="reference")
    shaped = MeasuredCosts(sizes, _shaped(base), ["bf16"] * L, kernel="reference")
    call = base.rate("bf16/reference").call_s
    # decode steps (as many rows as sequences, batched too) and experts of up to 2 tokens: unchanged
    for rows in (1, 4):
        assert shaped.dense_s(0, rows, rows) == plain.dense_s(0, rows, rows)
        assert shaped.head_s(rows, rows) == plain.head_s(rows, rows)
    assert shaped.expert_s(0, 2) == plain.expert_s(0, 2)
    # a 64-row prompt of one sequence
    assert shaped.dense_s(0, 64, 1) == pytest.approx(COSTS.layer(64) + call)
    assert shaped.head_s(1, 64) == pytest.approx(COSTS.forward(64))
    assert shaped.expert_s(0, 16) == pytest.approx(4e-5 + 16 * 1e-6)
    # two prompts in one step: the second's head row on top
    extra = 2.0 * sizes.head_params / base.matmul_rate(sizes.dtype)
    assert shaped.head_s(2, 64) == pytest.approx(COSTS.forward(64) + extra)
    # a variant the shape was not measured for: the profile's fit
    int8 = MeasuredCosts(sizes, _shaped(base), ["int8"] * L, kernel="reference")
    assert int8.expert_s(0, 16) == MeasuredCosts(sizes, base, ["int8"] * L, kernel="reference").expert_s(0, 16)
    # an offloaded layer's float experts: one call each
    off = MeasuredCosts(sizes, _shaped(base), ["bf16"] * L, kernel="reference", offloaded=True)
    assert off.expert_s(0, 16) == pytest.approx(2e-4 + 16 * 2e-6)


@pytest.mark.parametrize("built", [True, False])
def test_an_offloaded_quantized_prompt_on_a_cpu_is_priced_as_the_resident_layer(built, monkeypatch):
    """Quantized experts offloaded on a CPU run a prompt over the cache's slots on the resident schedule
    (moeinfer/offload/slot_experts.py) where the native library is built; without it, one call each."""
    from moeinfer.kernels import native

    monkeypatch.setattr(native, "unavailable_reason", lambda: None if built else "not built here")
    sizes = sizes_from_checkpoint("tiny")
    base = synthetic_profile()
    assert base.device == "cpu"
    off = MeasuredCosts(sizes, _shaped(base), ["int4"] * sizes.num_layers, kernel="reference", offloaded=True)
    assert off.expert_s(0, 16) == pytest.approx(2e-5 + 16 * 3e-6 if built else 1e-4 + 16 * 3e-6)


@pytest.mark.parametrize("rows", [True, False], ids=["rows kernel", "torch GEMMs"])
def test_an_offloaded_float_prompt_is_priced_as_resident_where_the_cpu_kernel_runs_its_rows_kernel(rows, monkeypatch):
    """Float experts offloaded with kernel 'cpu' run a prompt over the slots where the cpu kernel's schedule
    is its native rows kernel (bf16 on CPUs without a native bf16 matmul); elsewhere one call each."""
    from moeinfer.kernels import native
    from moeinfer.planning import costs as costs_mod

    monkeypatch.setattr(native, "unavailable_reason", lambda: None)
    monkeypatch.setattr(costs_mod, "rows_schedule", lambda dtype: rows)
    sizes = sizes_from_checkpoint("tiny")
    prof = _shaped(synthetic_profile(), replace(COSTS, experts={**COSTS.experts, "bf16/cpu": (5e-5, 1e-6)},
                                                offloaded={**COSTS.offloaded, "bf16/cpu": (3e-4, 2e-6)}))
    off = MeasuredCosts(sizes, prof, ["bf16"] * sizes.num_layers, kernel="cpu", offloaded=True)
    assert off.expert_s(0, 16) == pytest.approx(5e-5 + 16 * 1e-6 if rows else 3e-4 + 16 * 2e-6)
    ref = MeasuredCosts(sizes, prof, ["bf16"] * sizes.num_layers, kernel="reference", offloaded=True)
    assert ref.expert_s(0, 16) == pytest.approx(2e-4 + 16 * 2e-6)  # the reference kernel: one call each


def test_a_streamed_prompt_load_is_priced_as_a_call_of_its_own(monkeypatch):
    """A load without a slot streams through the transient buffer and runs a call of its own: in a prompt
    it costs the one-call line (`ShapeCosts.offloaded`), the layer's other experts the resident one;
    decode rows keep the fit; a variant without a one-call line keeps the resident line."""
    from moeinfer.kernels import native

    monkeypatch.setattr(native, "unavailable_reason", lambda: None)
    sizes = sizes_from_checkpoint("tiny")
    off = MeasuredCosts(sizes, _shaped(synthetic_profile()), ["int4"] * sizes.num_layers, kernel="reference",
                        offloaded=True)
    assert off.expert_s(0, 16) == pytest.approx(2e-5 + 16 * 3e-6)  # over the slots: resident
    assert off.expert_s(0, 16, alone=True) == pytest.approx(1e-4 + 16 * 3e-6)  # streamed: its own call
    assert off.expert_s(0, 1, alone=True) == off.expert_s(0, 1)  # decode: the fit either way
    no_line = _shaped(synthetic_profile(), replace(COSTS, offloaded={}))
    off = MeasuredCosts(sizes, no_line, ["int4"] * sizes.num_layers, kernel="reference", offloaded=True)
    assert off.expert_s(0, 16, alone=True) == pytest.approx(2e-5 + 16 * 3e-6)


def test_the_simulator_prices_exactly_the_loads_without_a_slot_alone():
    """simulate passes alone=True for the experts whose load has no slot (a global cache smaller than a
    layer's experts streams the rest), and for no other."""
    from moeinfer.offload.hardware import HardwareProfile
    from moeinfer.offload.simulator import simulate

    sizes = sizes_from_checkpoint("tiny")
    trace = routes.prefill(routes.uniform(num_layers=sizes.num_layers, num_experts=sizes.num_experts,
                                          top_k=sizes.top_k, sequences=2, tokens=32))
    hw = HardwareProfile(name="t", link_gbps=0.5, fast_mem_gbps=50.0, compute_tflops=0.05, measured=True)
    seen = []

    class Clock:
        def dense_s(self, layer, tokens, sequences=1):
            return 0.0

        def expert_s(self, layer, tokens, alone=False):
            seen.append(alone)
            return 1e-3

        def head_s(self, tokens, rows=1):
            return 0.0

    for cache in (3, 6, 8 * sizes.num_layers):
        seen.clear()
        cfg = OffloadConfig(tier="disk", cache=cache, scope="global", policy="lru", offload_dir="unused")
        got = simulate(trace, shape=sizes.shape(), config=cfg, hardware=hw, costs=Clock())
        assert sum(seen) == got.cache["transient_loads"]
        assert (got.cache["transient_loads"] > 0) == (cache < sizes.num_experts)


def test_the_simulator_and_the_layer_split_agree_with_the_measured_prompt_costs():
    sizes = sizes_from_checkpoint("tiny")
    prof = _shaped(synthetic_profile())
    trace = routes.prefill(routes.uniform(num_layers=sizes.num_layers, num_experts=sizes.num_experts,
                                          top_k=sizes.top_k, sequences=2, tokens=32))
    costs = MeasuredCosts(sizes, prof, ["bf16"] * sizes.num_layers, kernel="reference")
    per_layer, steps = layer_seconds(trace, costs)
    assert steps == pytest.approx(2 * COSTS.forward(32))
    got = simulate_plan(trace, sizes, prof, ["bf16"] * sizes.num_layers, kernel="reference")
    assert got.time_s == pytest.approx(sum(per_layer) + steps)


@pytest.mark.parametrize("decode", [True, False])
def test_on_a_cpu_a_prompts_loads_do_not_hide_behind_its_experts(decode):
    """overlap_prompts=False: steps holding prompt rows wait for their loads, decode steps overlap."""
    from moeinfer.offload.hardware import HardwareProfile
    from moeinfer.offload.simulator import simulate

    sizes = sizes_from_checkpoint("tiny")
    trace = routes.uniform(num_layers=sizes.num_layers, num_experts=sizes.num_experts, top_k=sizes.top_k,
                           sequences=2, tokens=16)
    trace = routes.batched(trace, 1) if decode else routes.prefill(trace)
    assert all((len(s.rows) == s.sequences) == decode for s, _ in planned_steps(trace))
    hw = HardwareProfile(name="t", link_gbps=0.5, fast_mem_gbps=50.0, compute_tflops=0.05, cpu_mem_gbps=50.0,
                         cpu_gflops=50.0, measured=True, description="test")
    cfg = OffloadConfig(tier="disk", cache=6, scope="global", policy="lru", offload_dir="unused")

    def run(**kw):
        return simulate(trace, shape=sizes.shape(), config=cfg, hardware=hw, **kw).time_s
    hidden, waits = run(overlap=True), run(overlap=False)
    assert waits > hidden  # the trace has loads to hide
    assert run(overlap=True, overlap_prompts=False) == pytest.approx(hidden if decode else waits)
    # the planner: a CPU's offloaded prompts wait, a GPU's overlap
    offload = PlanOffload(tier="disk", cache_experts=6, scope="global", policy="lru", prefetch="none")
    prof = synthetic_profile()
    cpu = simulate_plan(trace, sizes, prof, ["bf16"] * sizes.num_layers, kernel="reference", offload=offload)
    gpu = simulate_plan(trace, sizes, replace(prof, device="cuda"), ["bf16"] * sizes.num_layers,
                        kernel="reference", offload=offload)
    assert (cpu.time_s == pytest.approx(gpu.time_s)) == decode
    assert cpu.time_s >= gpu.time_s


def test_expert_lines_come_from_two_prompt_lengths_priced_against_the_reference(monkeypatch):
    """Per active expert and per token-slot, less the module's call_s (one-expert modules: all of it);
    both lengths in turn with the reference each round, at the reference's price: a machine drifting
    from round to round leaves the line on the truth at that price."""
    prof = synthetic_profile()
    config = config_of("tiny")
    rows: list[int] = []  # the rows of each experts call, as the module sees them
    drift = iter([1.5] * 4 + [1.0] * 4 + ([2.0] * 4 + [1.3] * 4) * 10)  # per call: its round's speed
    order: list[str] = []

    def fake_module(variant, E, D, I, device):
        fake_module.E = E
        return lambda x, r: rows.append(x.shape[0]) or order.append("experts")

    def fake_timed(fn, device):
        def call():
            fn()
            slots = rows[-1] * (config.top_k if fake_module.E > 1 else 1)
            return next(drift) * (1e-5 + fake_module.E * 3e-5 + slots * 2e-6)
        return call

    monkeypatch.setattr(shape_profile, "experts_module", fake_module)
    monkeypatch.setattr(shape_profile, "timed", fake_timed)
    # the reference: 1 ms in the slow rounds; priced 2 ms in the shape costs' fit (their rounds' level)
    reference = shape_profile.Reference(call=lambda: order.append("reference") or next(drift) * 1e-3, seconds=2e-3)
    call_s = prof.rate("int4").call_s
    per_expert, per_token = shape_profile.expert_line(prof, "int4", config, torch.device("cpu"),
                                                      reference=reference, rounds=5)
    assert rows[:2] == [32, 256]
    assert order[:8] == ["reference", "experts"] * 4  # each length right after the reference
    assert per_token == pytest.approx(2 * 2e-6)
    assert per_expert == pytest.approx((2 * 1e-5 - call_s) / config.num_experts + 2 * 3e-5)
    rows.clear()
    fake_module("int4", 1, 0, 0, None)  # the one-expert call is priced as a module of one expert
    monkeypatch.setattr(shape_profile, "offloaded_expert",
                        lambda variant, config, device: lambda x: rows.append(x.shape[0]))
    per_call, per_token = shape_profile.expert_line(prof, "int4", config, torch.device("cpu"), lengths=(8, 64),
                                                    one=True, reference=reference, rounds=5)
    assert rows[:2] == [8, 64]
    assert (per_call, per_token) == pytest.approx((2 * (1e-5 + 3e-5), 2 * 2e-6))


@pytest.mark.parametrize("variant", ["bf16/reference", "bf16/cpu", "int8", "int4"])
def test_the_offloaded_expert_timed_is_the_offloaded_layers_call(variant):
    """Step 3 times the call an offloaded layer makes per cached expert (`expert_fn`: float weights by the
    variant's kernel, quantized codes from blobs): its output is the one-expert module's (every row
    routed to the expert at weight 1) within one bf16 rounding; a 1% error fails."""
    from moeinfer.model.moe import Routing

    config = config_of("tiny")
    n, D = 24, config.hidden_size
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = shape_profile.offloaded_expert(variant, config, torch.device("cpu"))(x)
    mod = shape_profile.experts_module(variant, 1, D, config.moe_intermediate_size, torch.device("cpu"))
    with torch.inference_mode():
        want = mod(x, Routing(indices=torch.zeros(n, 1, dtype=torch.long), weights=torch.ones(n, 1),
                              logits=torch.zeros(n, 1)))
    scale = float(want.float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-7, atol=1e-3 * scale)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got.float() * 1.01, want.float(), rtol=2.0**-7, atol=1e-3 * scale)


def test_prompt_costs_are_measured_once_and_cached_with_this_machines_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEINFER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(shape_profile, "machine_key", lambda device: "this-machine")
    monkeypatch.setattr(shape_profile, "profile_path", lambda device: tmp_path / "profile.json")
    measured = []
    monkeypatch.setattr(shape_profile, "measure_shape_costs",
                        lambda config, dtype, device: measured.append(dtype) or COSTS)
    monkeypatch.setattr(shape_profile, "expert_line", lambda prof, v, config, device, **kw: (1e-5, 1e-6))
    # a third of the free memory holds one layer of bf16 experts drawn plus one at 1 byte a weight:
    # int4 (codes, scales and zeros: ~0.53 bytes a weight) fits, int8 (~1.03), bf16 and +fp32 do not
    config = config_of("tiny")
    one = config.num_experts * 3 * config.hidden_size * config.moe_intermediate_size
    monkeypatch.setattr(shape_profile, "memory_available", lambda device: 3 * (one * 2 + one))
    prof = replace(synthetic_profile(), key="this-machine")
    got = shape_profile.with_shape_costs(prof, config, "bfloat16")
    key = shape_key(config, "bfloat16")
    assert measured == ["bfloat16"]
    assert set(got.shapes[key].experts) == {"int4"}
    assert set(got.shapes[key].offloaded) == set(prof.experts)
    saved = MachineProfile.from_dict(json.loads((tmp_path / "profile.json").read_text()))
    assert saved.shapes == got.shapes  # JSON round trip
    assert shape_profile.with_shape_costs(saved, config, "bfloat16") is saved
    assert measured == ["bfloat16"]  # not measured again
    # another machine's profile (a file the user passed in): measured, not written over this machine's
    (tmp_path / "profile.json").unlink()
    shape_profile.with_shape_costs(replace(prof, key="elsewhere"), config, "bfloat16")
    assert not (tmp_path / "profile.json").exists()


def test_plan_measures_the_prompt_costs_of_the_models_shape(monkeypatch):
    from moeinfer.planning import planner

    seen = []
    monkeypatch.setattr(planner, "machine_profile", lambda device, **kw: synthetic_profile())

    def fake(prof, config, dtype, **kw):
        seen.append((config.hidden_size, dtype))
        return _shaped(prof)
    monkeypatch.setattr(planner, "with_shape_costs", fake)
    from plan_helpers import toy_quality

    plan = planner.plan("tiny", "120MB", quality=toy_quality(4), precisions=("bf16",))
    assert seen == [(config_of("tiny").hidden_size, "bfloat16")]
    assert plan.predicted is not None and plan.predicted.prefill_tok_s > 0


def test_a_one_row_decode_steps_experts_cost_what_a_model_of_the_shape_measured():
    """decode_experts replaces call_s + top-k one-token experts of the fit in a one-row step only."""
    sizes = sizes_from_checkpoint("tiny")
    L, K = sizes.num_layers, sizes.top_k
    base = synthetic_profile()
    plain = MeasuredCosts(sizes, base, ["int4"] * L, kernel="reference")
    shaped = MeasuredCosts(sizes, _shaped(base), ["int4"] * L, kernel="reference")
    step = shaped.dense_s(0, 1, 1) + K * shaped.expert_s(0, 1)
    dense_alone = plain.dense_s(0, 1, 1) - base.rate("int4").call_s
    assert step == pytest.approx(dense_alone + 9e-5)
    assert shaped.dense_s(0, 4, 4) == plain.dense_s(0, 4, 4)  # a batched decode step: the fit
    bf16 = MeasuredCosts(sizes, _shaped(base), ["bf16"] * L, kernel="reference")  # not measured: the fit
    assert bf16.dense_s(0, 1, 1) == MeasuredCosts(sizes, base, ["bf16"] * L, kernel="reference").dense_s(0, 1, 1)


def test_a_decode_steps_dense_part_and_once_a_step_costs_are_the_shapes():
    """Where the shape's decode step was measured (shape_costs step 5), a one-row decode step's dense part
    per layer is decode_layer_s (plus the experts' call) and its once-a-step costs decode_step_s; more
    rows add what the profile's rates price them at; prompts are unchanged."""
    sizes = sizes_from_checkpoint("tiny")
    L, K = sizes.num_layers, sizes.top_k
    base = synthetic_profile()
    measured = replace(COSTS, decode_layer_s=2e-4, decode_step_s=1e-4)
    plain = MeasuredCosts(sizes, _shaped(base), ["bf16"] * L, kernel="reference")
    shaped = MeasuredCosts(sizes, _shaped(base, measured), ["bf16"] * L, kernel="reference")
    call = base.rate("bf16/reference").call_s
    assert shaped.dense_s(0, 1, 1) == pytest.approx(2e-4 + call)
    assert shaped.head_s(1, 1) == pytest.approx(1e-4)
    for rows in (2, 4):  # batched decode steps: the measured row plus the rates' growth
        assert shaped.dense_s(0, rows, rows) - shaped.dense_s(0, 1, 1) == pytest.approx(
            plain.dense_s(0, rows, rows) - plain.dense_s(0, 1, 1))
        assert shaped.head_s(rows, rows) - shaped.head_s(1, 1) == pytest.approx(
            plain.head_s(rows, rows) - plain.head_s(1, 1))
    assert shaped.dense_s(0, 64, 1) == plain.dense_s(0, 64, 1) and shaped.head_s(1, 64) == plain.head_s(1, 64)
    # a resident one-row step: the layers' measured dense parts, their experts, the step's once-a-step costs
    per_layer, steps = layer_seconds(_one_row_trace(sizes), shaped)
    assert steps == pytest.approx(1e-4)
    assert per_layer[0] == pytest.approx(2e-4 + call + K * shaped.expert_s(0, 1))
    # with int4's decode experts measured in situ too: the step's layer is both figures
    int4 = MeasuredCosts(sizes, _shaped(base, measured), ["int4"] * L, kernel="reference")
    assert int4.dense_s(0, 1, 1) + K * int4.expert_s(0, 1) == pytest.approx(2e-4 + 9e-5)


def _one_row_trace(sizes):
    """One decode step of one sequence: top-k experts 0.. in every layer."""
    import numpy as np

    from moeinfer.traces.trace import RoutingTrace

    L, K, E = sizes.num_layers, sizes.top_k, sizes.num_experts
    return RoutingTrace(experts=np.tile(np.arange(K, dtype=np.int16), (1, L, 1)),
                        weights=np.full((1, L, K), 1.0 / K, np.float32), seq=np.zeros(1, int), pos=np.zeros(1),
                        is_prompt=np.zeros(1, bool), layers=np.arange(L), num_experts=E)


def test_in_situ_decode_is_the_median_of_the_rounds_layer_differences(monkeypatch):
    """Per round: a variant's 5- less 1-layer step, less the stubbed pair's, per layer; the median of the
    rounds (a round slow for one model moves one round's figure, not the result). The stubbed pair
    and every variant's pair run in the same rounds."""
    config = config_of("tiny")
    built = []
    ms = 1e-3

    def fake_rounds(models, rounds, tokens=16, count=None):
        built.extend(models)
        # stubbed 0.9 / 1.5 ms; int4 1.0 / 2.0 ms; int8 1.0 / 2.4 ms; round 1 is slow for int4's 5 layers
        rows = [[0.9 * ms, 1.5 * ms, 1.0 * ms, 2.0 * ms, 1.0 * ms, 2.4 * ms] for _ in range(rounds)]
        rows[1][3] = 9.0 * ms
        return rows, [0.0] * len(models)

    monkeypatch.setattr(shape_profile, "decode_gap_rounds", fake_rounds)
    got = shape_profile.decode_experts(["int4", "int8"], config, "bfloat16", torch.device("cpu"), rounds=3)
    assert got["int4"] == pytest.approx(1.0 * ms / 4 - 0.6 * ms / 4)  # per layer: 1.0 / 4 less 0.6 / 4
    assert got["int8"] == pytest.approx(1.4 * ms / 4 - 0.6 * ms / 4)
    kinds = [{type(b.experts).__name__ for b in m.moe_blocks()} for m in built]
    assert kinds == [{"_NoExperts"}] * 2 + [{"QuantizedExperts"}] * 4
    assert [len(m.moe_blocks()) for m in built] == [1, 5] * 3
    # measured only where 5 layers of the variant's experts fit in the last-level cache
    layer = config.num_experts * shape_profile.stored_expert_bytes("int4", config.hidden_size,
                                                                    config.moe_intermediate_size)
    assert shape_profile._in_cache("int4", config, 5 * layer)
    assert not shape_profile._in_cache("int4", config, 5 * layer - 1)
    assert not shape_profile._in_cache("int4", config, 0)  # unknown cache: not measured


def test_the_reference_is_timed_warm_right_after_itself(monkeypatch):
    """Reference.call runs the shape's 1-layer prompt twice and returns the second time (the first, after
    an experts call that flushed the cache, reads the weights from memory again); priced at the fit."""
    calls = []
    times = iter([0.05, 0.02])
    monkeypatch.setattr(shape_profile, "prefill_seconds",
                        lambda model, ids: calls.append((len(model.moe_blocks()), ids.shape[1])) or next(times))
    ref = shape_profile.Reference.of(COSTS, config_of("tiny"), "bfloat16", torch.device("cpu"))
    assert ref.call() == 0.02 and calls == [(1, 32), (1, 32)]
    assert ref.seconds == COSTS.reference_seconds()


def test_offloaded_layers_pay_the_host_costs_measured_on_the_models_shape():
    """Step 5: where the shape holds host costs for a precision they replace the profile's (a prompt's
    scaled by `after_decode`, as the shape's other prompt costs); another precision keeps the profile's.
    Each layer visit then costs the shape's visit, each load its load latency."""
    from moeinfer.planning.profile import OffloadHost

    sizes = sizes_from_checkpoint("tiny")
    L = sizes.num_layers
    base = replace(synthetic_profile(), offload_host={"int4": OffloadHost(2e-3, 0.0, 3e-3, 0.0)})
    shape = replace(COSTS, after_decode=1.5, offload_host={"int4": (5e-3, 1e-3, 7e-3, 2e-3)})
    assert base.offload_costs("int4", shape) == OffloadHost(5e-3, 1e-3, pytest.approx(1.05e-2), pytest.approx(3e-3))
    assert base.offload_costs("int8", shape) == base.offload_costs("int8") == base.offload_costs("bf16")
    assert base.offload_costs("int4", None) == OffloadHost(2e-3, 0.0, 3e-3, 0.0)
    tr = routes.batched(routes.uniform(num_layers=L, num_experts=8, top_k=2, sequences=2, tokens=8), 1)
    off = PlanOffload(tier="disk", cache_experts=10, policy="lru")
    plain = simulate_plan(tr, sizes, _shaped(base, replace(shape, offload_host={})), ["int4"] * L,
                          kernel="reference", offload=off)
    on_shape = simulate_plan(tr, sizes, _shaped(base, shape), ["int4"] * L, kernel="reference", offload=off)
    assert on_shape.cache == plain.cache  # the same cache decisions
    loads = plain.cache["demand_loads"]
    assert loads > 0
    assert on_shape.time_s - plain.time_s == pytest.approx(plain.steps * L * (5e-3 - 2e-3) + loads * 1e-3, rel=1e-9)
    back = MachineProfile.from_dict(json.loads(json.dumps(_shaped(base, shape).to_dict())))
    assert back.shapes[sizes.shape_key].offload_host == {"int4": (5e-3, 1e-3, 7e-3, 2e-3)}


def test_offload_host_costs_are_measured_on_the_shape_for_each_of_the_profiles_keys(monkeypatch):
    """Step 5: one `measure_offload` per key of the profile's `offload_host` ('bf16/cpu': float experts on
    the cpu kernel), on a fresh 3-layer model of the shape with bf16 experts, the load's bytes those of
    an expert of the shape at that precision, taken off at the page-cache read rate; nothing where the
    models would not fit in a third of the free memory."""
    from moeinfer.planning.profile import OffloadHost, stored_expert_bytes

    config = config_of("tiny")
    E, D, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
    calls = []

    def fake(device, link_gbps, repeats=9, precision="bf16", kernel=None, *, base=None, expert_bytes=None):
        m = base()
        assert len(m.moe_blocks()) == shape_profile.OFFLOAD_LAYERS
        assert all(tuple(b.experts.gate_up_proj.shape) == (E, 2 * I, D) for b in m.moe_blocks())
        calls.append((precision, kernel, link_gbps, expert_bytes))
        return OffloadHost(1e-4, 2e-5, 3e-4, 4e-5)

    monkeypatch.setattr(shape_profile, "measure_offload", fake)
    host = {k: OffloadHost(1.0, 1.0) for k in ("bf16", "int4", "bf16/cpu")}
    prof = replace(synthetic_profile(), offload_host=host, cached_link_gbps=5.0)
    got = shape_profile.offload_host(prof, config, "bfloat16", torch.device("cpu"))
    assert got == {k: (1e-4, 2e-5, 3e-4, 4e-5) for k in host}
    bf16 = stored_expert_bytes("bf16/reference", D, I)
    assert calls == [("bf16", None, 5.0, bf16), ("int4", None, 5.0, stored_expert_bytes("int4", D, I)),
                     ("bf16", "cpu", 5.0, bf16)]
    monkeypatch.setattr(shape_profile, "memory_available", lambda device: 3 * 9 * E * 12 * D * I - 1)
    assert shape_profile.offload_host(prof, config, "bfloat16", torch.device("cpu")) == {}
