"""A planned model runs its dense path (attention, norms, LM head) on the native CPU kernels where they
are built (moeinfer/planning/dense.py), its outputs match the eager model's within bf16 rounding, and
the cost model prices that path with the profile's rate for it (toy numbers)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from native_helpers import native_ops
from offload_helpers import generate_with_logits
from plan_helpers import synthetic_profile
from torch import nn

import moeinfer
from moeinfer.kernels import native, use_kernel_
from moeinfer.kernels.attention import CpuAttention
from moeinfer.kernels.linear import CpuLinear
from moeinfer.kernels.norm import CpuRMSNorm
from moeinfer.planning import Plan, PlanOffload, apply_plan_
from moeinfer.planning.costs import MeasuredCosts
from moeinfer.planning.sizes import sizes_from_checkpoint

PROMPT = [5, 9, 14, 3, 7, 22, 41, 8]


def _resident(kernel: str) -> Plan:
    return Plan(model="tiny", device="cpu", budget_bytes=10**9, objective="latency", precisions=("bf16",) * 4,
                offload=None, kernel=kernel)


def _streamed() -> Plan:
    return Plan(model="tiny", device="cpu", budget_bytes=10**9, objective="latency", precisions=("bf16",) * 4,
                offload=PlanOffload(tier="disk", cache_experts=6, policy="lru"), kernel="reference")


def _native_dense(model: nn.Module) -> bool:
    kinds = {type(m) for m in model.modules()}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return (bool(linears) and all(type(m) is CpuLinear for m in linears)
            and CpuRMSNorm in kinds and CpuAttention in kinds)


def _assert_bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Relative error of the logits (norm over all of them) within one bf16 epsilon (2^-7): the native and
    eager dense paths round each op's output to bf16 at different points. A 1% error fails."""
    def rel(x: torch.Tensor) -> float:
        return float((x.float() - want.float()).norm() / want.float().norm())

    bound = torch.finfo(torch.bfloat16).eps
    assert rel(got) <= bound, rel(got)
    assert rel(got.float() * 1.01) > bound  # a 1% error fails


@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_apply_plan_runs_the_native_dense_path_and_matches_the_eager_model(kernel):
    native_ops()
    ref = moeinfer.load("tiny", progress=False)
    use_kernel_(ref, kernel)  # the same expert kernel, eager dense path
    want_tokens, want = generate_with_logits(ref, PROMPT, 3)
    assert not any(isinstance(m, CpuLinear) for m in ref.modules())
    model = apply_plan_(moeinfer.load("tiny", progress=False), _resident(kernel))
    assert _native_dense(model)
    tokens, got = generate_with_logits(model, PROMPT, 3)
    assert tokens == want_tokens
    _assert_bf16_close(got, want)


def test_load_planned_streaming_experts_runs_the_native_dense_path():
    native_ops()
    ref = moeinfer.load("tiny", progress=False)
    want_tokens, want = generate_with_logits(ref, PROMPT, 3)
    model = moeinfer.load_planned("tiny", _streamed(), progress=False)
    try:
        assert _native_dense(model)
        tokens, got = generate_with_logits(model, PROMPT, 3)
    finally:
        model.offload.close()
    assert tokens == want_tokens
    _assert_bf16_close(got, want)


def test_without_the_native_kernels_the_torch_modules_stay(monkeypatch):
    monkeypatch.setattr(native, "unavailable_reason", lambda: "not built (test)")
    model = apply_plan_(moeinfer.load("tiny", progress=False), _resident("reference"))
    assert not any(isinstance(m, (CpuLinear, CpuRMSNorm, CpuAttention)) for m in model.modules())


def test_dense_part_and_head_are_priced_at_the_dense_paths_read_rate():
    sizes = sizes_from_checkpoint("tiny")
    # memory-bound numbers: matmuls at 1 PFLOP/s, so one token's dense part costs its bytes / read rate
    base = replace(synthetic_profile(), mem_read_gbps=50.0, dense_gflops={"bfloat16": 1e6})
    layers = ["bf16"] * sizes.num_layers
    for prof, gbps in ((base, 50.0), (replace(base, dense_read_gbps=5.0), 5.0)):
        c = MeasuredCosts(sizes, prof, layers, kernel="cpu")
        want_dense = (prof.layer_fixed_s + prof.rate("bf16/cpu").call_s
                      + sizes.dense_params_per_layer * sizes.dtype_bytes / (gbps * 1e9))
        assert c.dense_s(0, 1) == pytest.approx(want_dense, rel=1e-9)
        want_head = prof.step_fixed_s + sizes.head_params * sizes.dtype_bytes / (gbps * 1e9)
        assert c.head_s(1) == pytest.approx(want_head, rel=1e-9)


def test_the_profile_times_the_planned_dense_path(monkeypatch):
    """The profile's dense rates and tiny models run the path a planned model runs."""
    from moeinfer.planning.profile import _planned_linear, _tiny_model

    native_ops()
    cpu = torch.device("cpu")
    assert type(_planned_linear(64, 32, torch.bfloat16, cpu)) is CpuLinear
    assert _native_dense(_tiny_model(1, cpu))
    monkeypatch.setattr(native, "unavailable_reason", lambda: "not built (test)")
    assert type(_planned_linear(64, 32, torch.bfloat16, cpu)) is nn.Linear
    assert not _native_dense(_tiny_model(1, cpu))
