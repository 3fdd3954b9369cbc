"""`moeinfer.plan` / `apply_plan_`: the Plan type and its YAML, applying a plan, the cost model against the
offload simulator, routing views, and plans on synthetic profiles (no timing: profiles are given)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from plan_helpers import synthetic_profile, toy_quality

import moeinfer
from moeinfer.planning import Plan, PlanError, PlanOffload, Prediction, apply_plan_
from moeinfer.planning import routing as routes
from moeinfer.planning.costs import MeasuredCosts, fixed_bytes, layer_seconds, simulate_plan
from moeinfer.planning.planner import parse_budget, plan
from moeinfer.planning.quality import fit_alpha
from moeinfer.planning.sizes import checkpoint_bytes, sizes_from_checkpoint, sizes_from_model


def sample_plan(**kw) -> Plan:
    runner = Plan(model="tiny", device="cpu", budget_bytes=30_000_000, objective="latency",
                  precisions=("bf16",) * 4, offload=PlanOffload(tier="disk", cache_experts=5, policy="lfu",
                                                                 prefetch="next-layer"),
                  kernel="reference", predicted=Prediction(10.0, 100.0, 20_000_000, 0.0, 2.0, 100.0))
    base = dict(model="tiny", device="cpu", budget_bytes=30_000_000, objective="latency",
                precisions=("int8", "bf16", "q4_0", "bf16"), kernel="cpu", fp32_weights=True,
                predicted=Prediction(decode_tok_s=123.5, prefill_tok_s=999.0, memory_bytes=12_345_678,
                                     quality_loss=0.004, bits_per_byte=2.01, step_ms=8.1),
                notes=("routing recorded", "quality toy"), runners_up=(runner,))
    base.update(kw)
    return Plan(**base)


# --- the Plan type ---

def test_plan_yaml_round_trip(tmp_path):
    p = sample_plan()
    path = p.save(tmp_path / "plan.yaml")
    assert Plan.load(path) == p
    assert Plan.from_dict(p.to_dict()) == p
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temp file left


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(colour="red"), "unknown field"),
    (lambda d: d.pop("precisions"), "missing field"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.update(objective="fast"), "objective"),
    (lambda d: d["runners_up"][0]["offload"].update(slots=3), r"runners_up\[0\].offload: unknown field"),
    (lambda d: d.update(batch_size="4"), "batch_size must be an integer"),
])
def test_bad_plan_files_name_the_field(tmp_path, edit, message):
    import yaml

    d = sample_plan().to_dict()
    edit(d)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(PlanError, match=message) as e:
        Plan.load(path)
    assert str(path) in str(e.value)


def test_plan_file_errors(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("a: [1,")
    with pytest.raises(PlanError, match="not valid YAML"):
        Plan.load(tmp_path / "x.yaml")
    with pytest.raises(PlanError, match="offloaded experts share one precision"):
        sample_plan(offload=PlanOffload())


def test_parse_budget():
    assert parse_budget("8GB") == 8 * 10**9
    assert parse_budget("512MiB") == 512 * 2**20
    assert parse_budget(1000) == 1000
    with pytest.raises(PlanError, match="needs a unit"):
        parse_budget("8")
    with pytest.raises(PlanError, match="not a size"):
        parse_budget("lots")


# --- applying a plan ---

def test_apply_plan_sets_precisions_and_kernel():
    from moeinfer.formats.quantized_experts import QuantizedExperts
    from moeinfer.model.moe import Experts

    model = moeinfer.load("tiny", progress=False)
    ref = [(b.experts.gate_up_proj.detach().clone(), b.experts.down_proj.detach().clone()) for b in model.moe_blocks()]
    apply_plan_(model, sample_plan())
    blocks = model.moe_blocks()
    assert [type(b.experts) for b in blocks] == [QuantizedExperts, Experts, QuantizedExperts, Experts]
    assert blocks[0].experts.bits == [8] * 8 and blocks[2].experts.bits == [4] * 8
    assert blocks[2].experts.group_size == 32  # q4_0's groups
    assert {blocks[1].experts.kernel, blocks[3].experts.kernel} == {"cpu"}
    assert blocks[1].experts.compute_weights is not None  # fp32_weights
    assert model.plan == sample_plan()
    # the int8 layer holds exactly what the int8 preset gives that layer (rtn, group 128)
    q = QuantizedExperts.from_float(ref[0][0], ref[0][1], [8] * 8, group_size=128, algorithm="rtn")
    assert torch.equal(q.q8_gate_up, blocks[0].experts.q8_gate_up)
    assert torch.equal(q.s8_down, blocks[0].experts.s8_down)
    # float layers untouched
    assert torch.equal(blocks[1].experts.gate_up_proj, ref[1][0])


def test_apply_plan_offload(tmp_path):
    model = moeinfer.load("tiny", progress=False)
    p = sample_plan().runners_up[0]
    p.save(tmp_path / "plan.yaml")
    apply_plan_(model, tmp_path / "plan.yaml", offload_dir=tmp_path / "store")
    cfg = model.offload.config
    assert (cfg.tier, cfg.cache.experts, cfg.scope, cfg.policy, cfg.prefetch, cfg.cpu_assist) == (
        "disk", 5, "global", "lfu", "next-layer", False)
    assert model.offload.cache.num_slots == 5
    out = moeinfer.generate(model, ["The"], max_new_tokens=3, ignore_eos=True)[0]
    assert len(out.token_ids) == 3


def test_apply_plan_layer_count_mismatch():
    model = moeinfer.load("tiny", progress=False)
    with pytest.raises(PlanError, match="lists 3 MoE layers; this model has 4"):
        apply_plan_(model, sample_plan(precisions=("bf16",) * 3, runners_up=()))


def test_plan_applied_model_saves_and_loads_equal(tmp_path):
    model = apply_plan_(moeinfer.load("tiny", progress=False), sample_plan(kernel="reference", fp32_weights=False))
    again = moeinfer.load(moeinfer.save(model, tmp_path / "planned"), progress=False)
    moeinfer.use_kernel_(again, "reference")  # the kernel is a run-time choice, not part of the checkpoint
    assert [type(b.experts).__name__ for b in again.moe_blocks()] == [
        "QuantizedExperts", "Experts", "QuantizedExperts", "Experts"]
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(model(ids), again(ids))


def test_quantize_layers_rejects_unknown_precision():
    from moeinfer.compress.api import compress_

    model = moeinfer.load("tiny", progress=False)
    with pytest.raises(ValueError, match="layer precision 'int5' is not known"):
        compress_(model, [{"method": "quantize_layers", "precisions": ["int5"] * 4}], progress=False)
    with pytest.raises(ValueError, match="3 precisions for 4 MoE layers"):
        compress_(model, [{"method": "quantize_layers", "precisions": ["int8"] * 3}], progress=False)


def test_memory_model_counts_quantized_experts_as_stored():
    from moeinfer.formats.quantized_experts import QuantizedExperts
    from moeinfer.planning.profile import stored_expert_bytes

    D, I, E = 192, 384, 3  # the shipped model's shape: groups of 128 do not divide D
    g = torch.Generator().manual_seed(0)
    gu, dn = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)
    for name, bits, group, algorithm in (("int8", 8, 128, "rtn"), ("int4", 4, 128, "rtn"), ("q4_0", 4, 32, "sym")):
        q = QuantizedExperts.from_float(gu, dn, [bits] * E, group_size=group, algorithm=algorithm)
        stored = sum(p.numel() * p.element_size() for p in q.parameters())
        assert stored_expert_bytes(name, D, I) * E == stored
    assert stored_expert_bytes("bf16/cpu", D, I) == 3 * D * I * 2


# --- sizes without weights ---

def test_sizes_from_config_alone_equal_the_loaded_model(tmp_path):
    from moeinfer.models import resolve_model_path

    src = resolve_model_path("tiny")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())  # no weights at all
    s = sizes_from_checkpoint(tmp_path)
    m = sizes_from_model(moeinfer.load("tiny", progress=False))
    assert (s.num_layers, s.num_experts, s.top_k, s.hidden, s.inter, s.dense_params_per_layer, s.other_params,
            s.head_params, s.kv_bytes_per_token, s.dtype_bytes) == (
        m.num_layers, m.num_experts, m.top_k, m.hidden, m.inter, m.dense_params_per_layer, m.other_params,
        m.head_params, m.kv_bytes_per_token, m.dtype_bytes)
    assert checkpoint_bytes("tiny") == s.total_bytes  # safetensors headers agree with config.json


# --- routing views ---

def test_batched_and_prefill_views():
    tr = routes.uniform(num_layers=2, num_experts=4, top_k=2, sequences=4, tokens=3)
    from moeinfer.offload.visits import trace_steps

    steps = trace_steps(routes.batched(tr, 2))
    assert len(steps) == 2 * 3  # 2 groups of 2 sequences x 3 positions
    for s in steps:
        rows = routes.batched(tr, 2)
        assert len(s.rows) == 2 and len(set(rows.pos[s.rows])) == 1 and len(set(rows.seq[s.rows])) == 2
    assert len(trace_steps(routes.batched(tr, 1))) == 12
    pre = trace_steps(routes.prefill(tr))
    assert [len(s.rows) for s in pre] == [3, 3, 3, 3]
    a, b = routes.split(tr)
    assert a.num_tokens == b.num_tokens == 6 and not set(a.seq) & set(b.seq)


# --- the cost model is the simulator's clock ---

def test_layer_seconds_sum_equals_the_simulator():
    sizes = sizes_from_checkpoint("tiny")
    prof = synthetic_profile()
    tr = routes.uniform(num_layers=4, num_experts=8, top_k=2, sequences=3, tokens=5)
    precs = ["int8", "bf16", "int4", "bf16"]
    for B in (1, 2):
        view = routes.batched(tr, B)
        per_layer, steps = layer_seconds(view, MeasuredCosts(sizes, prof, precs, kernel="cpu"))
        sim = simulate_plan(view, sizes, prof, precs, kernel="cpu")
        assert sim.cache["hit_rate"] == 1.0 and sim.bytes_moved == 0  # every expert resident
        assert sim.time_s == pytest.approx(sum(per_layer) + steps, rel=1e-12)


def test_offloaded_plan_uses_the_simulator_decisions():
    from moeinfer.offload.simulator import simulate

    sizes = sizes_from_checkpoint("tiny")
    prof = synthetic_profile()
    tr = routes.uniform(num_layers=4, num_experts=8, top_k=2, sequences=2, tokens=8)
    off = PlanOffload(tier="disk", cache_experts=10, policy="lru")
    got = simulate_plan(tr, sizes, prof, ["bf16"] * 4, kernel="reference", offload=off)
    plain = simulate(tr, shape=sizes.shape(), config=off.config(offload_dir="x"), hardware=prof.hardware())
    assert got.cache == plain.cache and got.bytes_moved == plain.bytes_moved > 0  # same decisions, other clock


# --- plans on synthetic profiles ---

def test_plan_trades_precision_for_memory_and_respects_quality():
    prof = synthetic_profile()
    q = toy_quality(4)
    sizes = sizes_from_checkpoint("tiny")
    fixed = fixed_bytes(sizes, batch=1, context=256)
    float_layer = 8 * sizes.expert_params * 2
    big = plan("tiny", fixed + 4 * float_layer + 10**6, profile=prof, quality=q, precisions=("bf16", "int8", "int4"),
               max_quality_loss=0.5)
    # int4 streams fastest on this machine, and the loss budget allows it everywhere
    assert big.precisions == ("int4",) * 4 and big.offload is None
    assert big.predicted.memory_bytes <= big.budget_bytes
    assert len(big.runners_up) == 3
    assert all(r.predicted.decode_tok_s <= big.predicted.decode_tok_s for r in big.runners_up)
    # a 0.3% loss budget: int8 costs 0.05%..0.2% per layer, int4 1%..4%: no int4, int8 on the first layers
    tight = plan("tiny", fixed + 4 * float_layer + 10**6, profile=prof, quality=q, max_quality_loss=0.003)
    assert "int4" not in tight.precisions
    assert tight.predicted.quality_loss <= 0.003
    assert tight.precisions[0] == "int8"  # the least sensitive layer is quantized first
    # no quality loss allowed: float only
    exact = plan("tiny", fixed + 4 * float_layer + 10**6, profile=prof, quality=q, max_quality_loss=0.0)
    assert set(exact.precisions) == {"bf16"} and exact.predicted.quality_loss == 0.0
    assert exact.kernel == "cpu"  # the faster float kernel on this profile


def test_plans_of_a_checkpoint_report_their_load_peak():
    """load_planned quantizes one layer of float experts at a time while loading, beside every layer's
    quantized experts (an offloaded plan's one quantized layer: it writes each to its store once made):
    a plan of a checkpoint reports that peak,
    and says so when it is above the budget; a plan of a loaded model has none."""
    from moeinfer.planning.costs import expert_bytes

    prof = synthetic_profile()
    sizes = sizes_from_checkpoint("tiny")
    fixed = fixed_bytes(sizes, batch=1, context=256)
    int4_all = 4 * 8 * expert_bytes(sizes, "int4")
    float_layer = 8 * expert_bytes(sizes, "bf16")
    roomy = plan("tiny", fixed + int4_all + float_layer + 10**6, profile=prof, quality=toy_quality(4),
                 precisions=("bf16", "int4"), max_quality_loss=0.5, context=256)
    assert roomy.precisions == ("int4",) * 4 and roomy.offload is None
    assert roomy.predicted.load_peak_bytes == roomy.predicted.memory_bytes + float_layer
    assert not any("peaks at" in n for n in roomy.notes)
    # offloaded int4: each layer is written to the store once quantized, one quantized layer held
    small = plan("tiny", fixed + 8 * expert_bytes(sizes, "bf16"), profile=prof, quality=toy_quality(4),
                 precisions=("bf16", "int4"), max_quality_loss=0.5, context=256)
    assert small.offload is not None and small.precisions == ("int4",) * 4
    assert small.predicted.load_peak_bytes == fixed + int4_all // 4 + float_layer > small.budget_bytes
    assert any("peaks at" in n for n in small.notes)
    floats = plan("tiny", small.budget_bytes, profile=prof, quality=toy_quality(4), precisions=("bf16",),
                  context=256)
    assert floats.offload is not None and floats.predicted.load_peak_bytes == floats.predicted.memory_bytes
    loaded = plan(moeinfer.load("tiny", progress=False), fixed + int4_all + float_layer + 10**6, profile=prof,
                  quality=toy_quality(4), precisions=("bf16", "int4"), max_quality_loss=0.5, context=256)
    assert loaded.predicted.load_peak_bytes == 0 and not any("peaks at" in n for n in loaded.notes)


def test_plan_prefers_float_when_quantized_kernels_are_slow():
    prof = synthetic_profile(int4_bytes_per_s=1e8)  # int4 dequantizes slowly (today's eager CPU path)
    sizes = sizes_from_checkpoint("tiny")
    budget = fixed_bytes(sizes, batch=1, context=256) + 4 * 8 * sizes.expert_params * 2 + 10**6
    p = plan("tiny", budget, profile=prof, quality=toy_quality(4), max_quality_loss=0.5)
    assert "int4" not in p.precisions


def test_plan_offloads_when_experts_do_not_fit():
    """Room for six float experts (a layer has eight): five slots and the transient buffer a prompt's
    other misses stream through; room for eight or nine: that many slots and no transient buffer."""
    prof = synthetic_profile()
    sizes = sizes_from_checkpoint("tiny")
    assert sizes.num_experts == 8
    fixed = fixed_bytes(sizes, batch=1, context=256)
    for room, slots in ((6, 5), (8, 8), (9, 9)):
        budget = fixed + room * sizes.expert_params * 2  # no resident configuration fits
        p = plan("tiny", budget, profile=prof, quality=toy_quality(4), max_quality_loss=0.0)
        assert p.offload is not None and p.offload.tier == "disk" and p.offload.cache_experts == slots
        assert p.predicted.memory_bytes == fixed + room * sizes.expert_params * 2 <= budget
    with pytest.raises(PlanError, match="nothing fits"):
        plan("tiny", fixed // 2, profile=prof, quality=toy_quality(4))


def test_plan_argument_errors():
    prof = synthetic_profile()
    with pytest.raises(ValueError, match="layer precision 'int5' is not known"):
        plan("tiny", "200MB", profile=prof, precisions=("bf16", "int5"))
    with pytest.raises(PlanError, match="objective"):
        plan("tiny", "200MB", profile=prof, objective="fastest")
    with pytest.raises(PlanError, match="fraction"):
        plan("tiny", "200MB", profile=prof, max_quality_loss=5)


def test_throughput_objective_picks_a_batch():
    prof = synthetic_profile()
    p = plan("tiny", "200MB", profile=prof, quality=toy_quality(4), objective="throughput", batch_sizes=(1, 4))
    assert p.batch_size == 4  # more rows per step share the weights read
    lat = plan("tiny", "200MB", profile=prof, quality=toy_quality(4))
    assert lat.batch_size == 1


def test_bigger_than_memory_checkpoint_is_planned_from_its_config(tmp_path, monkeypatch):
    """A Mixtral-8x7B-shaped folder holding only config.json (93 GB of bf16 weights if it had them)."""
    from moeinfer.planning import planner, sizes as sizes_mod

    cfg = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(sizes_mod, "available_memory", lambda device: 24 * 10**9)

    def no_load(*a, **k):
        raise AssertionError("planning must not load a checkpoint bigger than memory")
    monkeypatch.setattr("moeinfer.api.load", no_load)
    p = plan(tmp_path, "16GB", profile=synthetic_profile())
    s = sizes_from_checkpoint(tmp_path)
    assert s.total_bytes > 90 * 10**9
    assert p.offload is not None and p.offload.tier == "disk"
    assert set(p.precisions) == {"bf16"}  # quality cannot be measured without the weights
    assert p.predicted.memory_bytes <= 16 * 10**9
    assert any("uniform" in n for n in p.notes) and any("quality not measured" in n for n in p.notes)
    assert planner.MAX_SIM_TOKENS >= 64


# --- quality model ---

def test_fit_alpha_recovers_a_known_slope():
    errors = {"int8": [0.01, 0.02], "int4": [0.1, 0.2]}
    assert fit_alpha(2.0, {"int8": 2.0 + 0.03 * 5, "int4": 2.0 + 0.3 * 5}, errors) == pytest.approx(5.0)
    assert fit_alpha(2.0, {"int8": 1.9}, errors) == 0.0  # a better score never gives a negative cost


def test_layer_errors_order_precisions():
    from moeinfer.planning.quality import layer_errors

    model = moeinfer.load("tiny", dtype="float32", progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    errs = layer_errors(model, ids, ["bf16", "int8", "q4_0"])  # q4_0: 4-bit without HQQ's search (fast)
    assert errs["bf16"] == [0.0] * 4
    for l in range(4):
        assert 0 < errs["int8"][l] < errs["q4_0"][l] < 1
    assert all(math.isfinite(e) for e in errs["q4_0"])


def test_moeinfer_plan_is_the_function_even_after_importing_the_package_and_import_is_light():
    import subprocess
    import sys

    code = ("import sys, torch, moeinfer; f = moeinfer.plan; import moeinfer.planning.spec; "
            "heavy = [m for m in ('transformers', 'triton', 'fastapi', 'matplotlib') if m in sys.modules]; "
            "print(f is moeinfer.planning.planner.plan, moeinfer.plan is f, moeinfer.planning.plan is f, heavy, "
            "torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True True True [] False"
