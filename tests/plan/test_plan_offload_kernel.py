"""Offloaded float experts on a CPU run kernel 'reference' or 'cpu' (one call per cached expert): the
search weighs both with the profile's rates and host costs, and `apply_plan_` / `load_planned` run
the kernel a plan names."""

from __future__ import annotations

from dataclasses import replace

import torch
from offload_helpers import generate_with_logits
from plan_helpers import synthetic_profile, toy_quality

import moeinfer
from moeinfer.planning import Plan, PlanOffload, apply_plan_
from moeinfer.planning.costs import expert_bytes, fixed_bytes
from moeinfer.planning.planner import plan
from moeinfer.planning.profile import OffloadHost
from moeinfer.planning.sizes import sizes_from_checkpoint


def _budget() -> int:
    sizes = sizes_from_checkpoint("tiny")
    return fixed_bytes(sizes, batch=1, context=256) + 8 * expert_bytes(sizes, "bf16")


def test_search_chooses_the_faster_kernel_for_offloaded_float_experts():
    # toy machine: the cpu kernel streams float experts at 4 GB/s, the reference at 2 GB/s
    prof = synthetic_profile()
    p = plan("tiny", _budget(), profile=prof, quality=toy_quality(4), precisions=("bf16",))
    assert p.offload is not None and p.kernel == "cpu"
    assert any(r.kernel == "reference" for r in p.runners_up)
    # the same machine where an offloaded layer on the cpu kernel costs 50 ms more: the reference wins
    slow = replace(prof, offload_host={"bf16/cpu": OffloadHost(layer_s=0.05, load_latency_s=0.0)})
    q = plan("tiny", _budget(), profile=slow, quality=toy_quality(4), precisions=("bf16",))
    assert q.offload is not None and q.kernel == "reference"
    assert q.predicted.decode_tok_s > max(r.predicted.decode_tok_s for r in q.runners_up if r.kernel == "cpu")


def _offloaded(kernel: str) -> Plan:
    return Plan(model="tiny", device="cpu", budget_bytes=_budget(), objective="latency", precisions=("bf16",) * 4,
                offload=PlanOffload(tier="disk", cache_experts=6, policy="lru"), kernel=kernel)


def test_apply_plan_and_load_planned_run_the_plans_kernel(tmp_path):
    """In fp32: the reference kernel is bit-equal to the resident model; the cpu kernel (one call per
    cached expert) matches the resident model on the same kernel within fp32 tolerance (both on the
    planned dense path: tests/plan/test_plan_dense_path.py compares it with the eager one)."""
    from kernel_cases import tolerance

    from moeinfer.kernels import use_kernel_
    from moeinfer.planning.dense import use_planned_dense_

    prompt = [5, 9, 14, 3]
    for kernel in ("cpu", "reference"):
        ref = moeinfer.load("tiny", progress=False, dtype="float32")
        use_kernel_(ref, kernel)
        use_planned_dense_(ref)
        _, want = generate_with_logits(ref, prompt, 4)
        model = apply_plan_(moeinfer.load("tiny", progress=False, dtype="float32"), _offloaded(kernel),
                            offload_dir=tmp_path / kernel)
        streamed = moeinfer.load_planned("tiny", _offloaded(kernel), progress=False, dtype="float32")
        try:
            for m in (model, streamed):
                assert all(b.experts.kernel == kernel for b in m.moe_blocks())
                _, got = generate_with_logits(m, prompt, 4)
                if kernel == "reference":
                    assert torch.equal(got, want)
                else:
                    atol = tolerance(want, torch.float32) * 10
                    torch.testing.assert_close(got, want, atol=atol, rtol=0)
                    assert not torch.allclose(got * 1.01, want, atol=atol, rtol=0)  # a 1% error fails
        finally:
            model.offload.close()
            streamed.offload.close()
