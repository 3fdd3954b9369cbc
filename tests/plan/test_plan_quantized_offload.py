"""Quantized *and* offloaded plans: the Plan type accepts one precision for offloaded experts, the
search weighs precision x placement jointly (a toy machine whose optimum is int4 offloaded), and
`apply_plan_` of such a plan runs the offloaded codes, equal to the resident quantized model."""

from __future__ import annotations

import pytest
import torch
from offload_helpers import generate_with_logits
from plan_helpers import synthetic_profile, toy_quality

import moeinfer
from moeinfer.planning import Plan, PlanError, PlanOffload, apply_plan_
from moeinfer.planning.costs import expert_bytes, fixed_bytes, simulate_plan
from moeinfer.planning.planner import plan
from moeinfer.planning.sizes import sizes_from_checkpoint
from moeinfer.offload.experts import OffloadedExperts

PROMPT = [5, 9, 14, 3, 22]


def _plan(**kw) -> Plan:
    base = dict(model="tiny", device="cpu", budget_bytes=30_000_000, objective="latency",
                precisions=("int8",) * 4, offload=PlanOffload(tier="disk", cache_experts=6, policy="lru"))
    base.update(kw)
    return Plan(**base)


def test_plan_type_accepts_one_quantized_precision_when_offloaded():
    assert _plan().precisions == ("int8",) * 4
    with pytest.raises(PlanError, match="offloaded experts share one precision"):
        _plan(precisions=("int8", "int4", "int8", "int8"))


def test_offloaded_quantized_link_moves_the_stored_bytes():
    sizes = sizes_from_checkpoint("tiny")
    prof = synthetic_profile()
    from moeinfer.planning import routing as routes

    tr = routes.uniform(num_layers=4, num_experts=8, top_k=2, tokens=32)
    off = PlanOffload(tier="disk", cache_experts=4, policy="lru")
    f = simulate_plan(tr, sizes, prof, ["bf16"] * 4, kernel="reference", offload=off)
    q = simulate_plan(tr, sizes, prof, ["int4"] * 4, kernel="reference", offload=off)
    # same cache decisions (same slots, same routing), int4 experts move their codes only
    assert q.cache["misses"] == f.cache["misses"] > 0
    ratio = expert_bytes(sizes, "int4") / expert_bytes(sizes, "bf16")
    assert q.bytes_moved == pytest.approx(f.bytes_moved * ratio, rel=1e-3)


def test_search_finds_int4_offloaded_when_it_is_the_optimum():
    """Toy machine: a 1 GB/s disk, int4 experts streamed fastest; a budget with room for 8 float experts:
    no resident choice fits even at int4 (32 experts), so offloading is forced, and at int4 the same bytes
    hold ~3.5x more slots and each miss moves ~3.5x fewer bytes: int4 offloaded beats float offloaded."""
    prof = synthetic_profile()
    sizes = sizes_from_checkpoint("tiny")
    fixed = fixed_bytes(sizes, batch=1, context=256)
    room = 8 * expert_bytes(sizes, "bf16")
    assert 32 * expert_bytes(sizes, "int4") > room  # nothing resident fits
    p = plan("tiny", fixed + room, profile=prof, quality=toy_quality(4), max_quality_loss=0.5,
             precisions=("bf16", "int8", "int4"))
    assert p.offload is not None and p.precisions == ("int4",) * 4
    assert p.offload.cache_experts == int(room // expert_bytes(sizes, "int4"))
    assert p.predicted.memory_bytes <= p.budget_bytes
    assert all(r.predicted.decode_tok_s < p.predicted.decode_tok_s for r in p.runners_up)
    # the prediction carries the simulated cache's hit rate: what a benchmark compares with the live cache's
    assert 0.0 < p.predicted.hit_rate < 1.0
    assert Plan.from_dict(p.to_dict()).predicted.hit_rate == p.predicted.hit_rate
    # no loss allowed: the same budget offloads float experts, 10 slots
    exact = plan("tiny", fixed + room, profile=prof, quality=toy_quality(4), max_quality_loss=0.0)
    assert exact.precisions == ("bf16",) * 4 and exact.offload is not None and exact.offload.cache_experts == 8
    assert exact.predicted.decode_tok_s < p.predicted.decode_tok_s  # what made int4 offloaded the optimum
    big = plan("tiny", 10**9, profile=prof, quality=toy_quality(4))
    assert big.offload is None and big.predicted.hit_rate is None  # resident: no cache to predict


def test_apply_plan_round_trip_of_a_quantized_offloaded_plan(tmp_path):
    p = _plan()
    p.save(tmp_path / "plan.yaml")
    assert Plan.load(tmp_path / "plan.yaml") == p
    ref = moeinfer.load("tiny", progress=False)
    apply_plan_(ref, _plan(offload=None))  # the same precisions, resident
    for b in ref.moe_blocks():
        b.experts.kernel = "reference"  # the eager reference the offloaded codes reproduce
    _, want = generate_with_logits(ref, PROMPT, 6)
    model = moeinfer.load("tiny", progress=False)
    apply_plan_(model, tmp_path / "plan.yaml", offload_dir=tmp_path / "store")
    try:
        assert all(isinstance(b.experts, OffloadedExperts) for b in model.moe_blocks())
        assert model.offload.packed is not None and model.offload.packed.bits == 8
        assert model.offload.cache.num_slots == 6
        assert model.plan == p
        assert {b.experts.kernel for b in model.moe_blocks()} == {"cpu"}  # native kernels where built
        moeinfer.use_kernel_(model, "reference")  # the eager reference: exact
        _, got = generate_with_logits(model, PROMPT, 6)
        assert model.offload.cache.stats.misses > 0
        assert torch.equal(got, want)
    finally:
        model.offload.close()
