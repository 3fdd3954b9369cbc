"""use_cpu_router_: the native one-token router logits (csrc/ops.cpp `gemv`) against the reference
matmul of moeinfer.model.moe.route, F.linear(x.float(), weight.float()), on the same weights. Both
accumulate in fp32 in another order: logits agree to 1e-5 relative (a 1% error fails), and the routing
that `select` makes of them is the reference's; each native variant forced by name."""

from __future__ import annotations

import types

import pytest
import torch

from moeinfer.config import RouterConfig
from moeinfer.kernels import use_kernel_
from moeinfer.kernels.router import CpuRouter, restore_router_, use_cpu_router_
from moeinfer.model.moe import Router, route
from native_helpers import native_ops, require, variant_params


def pair(E: int, D: int, dtype: torch.dtype, **rules) -> tuple[Router, Router]:
    cfg = types.SimpleNamespace(router=RouterConfig(num_experts=E, **rules), num_experts=E, hidden_size=D)
    ref = Router(cfg)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(E + D)))
        if ref.e_score_correction_bias is not None:
            ref.e_score_correction_bias.copy_(torch.rand(E, generator=torch.Generator().manual_seed(1)) * 0.1)
    ref = ref.to(dtype)
    fast = Router(cfg).to(dtype)
    fast.load_state_dict(ref.state_dict())
    assert use_cpu_router_(fast) == 1 and isinstance(fast, CpuRouter)
    return fast, ref


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


RULES = [dict(top_k=2), dict(top_k=8, norm_topk_prob=False),
         dict(top_k=4, score_func="sigmoid", n_group=4, topk_group=2, correction_bias=True, scaling=2.5)]


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,D", [(8, 64), (64, 2048), (60, 37)])
@pytest.mark.parametrize("rules", RULES, ids=["softmax", "no-renorm", "deepseek-v3"])
def test_native_router_matches_the_reference(variant, dtype, E, D, rules):
    require(variant)
    fast, ref = pair(E, D, dtype, **rules)
    fast.engine = variant
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        got, want = fast(x), ref(x)
        check(fast.logits(x), ref.logits(x))
    assert torch.equal(want.logits, route(x, ref.weight, ref.cfg, ref.e_score_correction_bias).logits)
    check(got.logits, want.logits)
    assert torch.equal(got.indices, want.indices)  # random logits: no two within fp32 rounding
    torch.testing.assert_close(got.weights, want.weights, rtol=1e-5, atol=1e-6)


def test_a_one_percent_error_fails_the_check():
    ref = torch.linspace(-3, 3, 64)
    with pytest.raises(AssertionError):
        check(ref * 1.01, ref)


def test_many_tokens_and_autograd_run_the_reference():
    native_ops()
    fast, ref = pair(8, 32, torch.float32, top_k=2)
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(fast.logits(x), ref.logits(x))
    xg = torch.randn(1, 32, requires_grad=True)
    fast(xg).weights.sum().backward()
    assert xg.grad is not None


def test_transforms_run_on_the_native_logits():
    native_ops()
    fast, ref = pair(8, 32, torch.float32, top_k=2)
    for r in (fast, ref):
        r.mask_expert(int(ref(torch.ones(1, 32)).indices[0, 0]))
    x = torch.ones(1, 32)
    with torch.no_grad():
        got, want = fast(x), ref(x)
    assert torch.equal(got.indices, want.indices) and int(got.rerouted) == int(want.rerouted) == 1


def test_use_kernel_linears_swaps_the_routers_and_restore_undoes_it(tiny_fp32):
    native_ops()
    model = tiny_fp32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = len(model.moe_blocks())
    use_kernel_(model, "auto", linears=True)
    assert sum(isinstance(m, CpuRouter) for m in model.modules()) == n > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert restore_router_(model) == n
    assert not any(isinstance(m, CpuRouter) for m in model.modules())
