"""use_cpu_linears_: bf16 dense linears on the native CPU kernels against F.linear in fp32 on the same
weights (bf16 output: one rounding, so a 1% error fails), every variant forced by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moeinfer.kernels import linear, use_kernel_
from moeinfer.kernels.linear import CpuLinear, restore_linears_, use_cpu_linears_
from native_helpers import native_ops, require, variant_params


def close_bf16(out: torch.Tensor, ref: torch.Tensor) -> None:
    """One or two bf16 roundings (the product, then the bias where torch's bf16 matmul runs): a 1%
    error of the output still fails."""
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, rtol=2.0**-8, atol=2.0**-9 * float(ref.abs().max()))


def pair(d_in: int, d_out: int, bias: bool) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    a = nn.Linear(d_in, d_out, bias=bias).bfloat16()
    b = nn.Linear(d_in, d_out, bias=bias).bfloat16()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("d_in,d_out", [(36, 20), (64, 1100), (2048, 96)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(1,), (1, 1), (5,), (2, 7)])
@pytest.mark.parametrize("half_matmul", ["slow", "slow-widened", "native"])
def test_cpu_linear_matches_fp32_reference(variant, d_in, d_out, bias, lead, half_matmul, monkeypatch):
    """Each path forced whatever this CPU is: several rows take the native rows product where bf16
    matmul is slow (AVX2), or from WIDEN_ROWS rows (forced down to 2 here) the widened weight in
    slices (forced to 7 output rows, so slices and a partial last one are used) and torch's fp32
    GEMM; torch's F.linear where bf16 matmul is native (AVX512-BF16/AMX)."""
    require(variant)
    monkeypatch.setattr(linear, "slow_half_matmul", lambda dtype: half_matmul != "native")
    if half_matmul == "slow-widened":
        monkeypatch.setattr(linear, "WIDEN_ROWS", 2)
        monkeypatch.setattr(linear, "WIDEN_SLICE_BYTES", 7 * 4 * d_in)
    fast, plain = pair(d_in, d_out, bias)
    assert use_cpu_linears_(fast, engine=variant) == 1 and isinstance(fast, CpuLinear)
    x = torch.randn(*lead, d_in).bfloat16()
    with torch.no_grad():
        out = fast(x)
    with torch.no_grad():
        ref = F.linear(x.float(), plain.weight.float(), None if plain.bias is None else plain.bias.float())
    close_bf16(out, ref)


def test_a_one_percent_error_fails_the_check():
    ref = torch.linspace(-1, 1, 64)
    with pytest.raises(AssertionError):
        close_bf16((ref * 1.01).bfloat16(), ref)


def test_transform_keeps_parameters_and_can_be_undone():
    native_ops()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False), nn.Linear(4, 4)).bfloat16()
    model[3].float()  # fp32 linears are left alone
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_cpu_linears_(model) == 2
    assert [type(m).__name__ for m in model] == ["CpuLinear", "ReLU", "CpuLinear", "Linear"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert restore_linears_(model) == 2 and all(type(m) is not CpuLinear for m in model)


def test_autograd_falls_back_to_torch():
    native_ops()
    lin, _ = pair(16, 8, True)
    use_cpu_linears_(lin)
    x = torch.randn(1, 16, dtype=torch.bfloat16, requires_grad=True)
    lin(x).float().sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


def test_use_kernel_applies_linears_on_request():
    native_ops()
    from compress_quant_helpers import build_random

    model = build_random("olmoe").bfloat16()
    ids = torch.tensor([[3, 9, 27]])
    with torch.no_grad():
        ref = model(ids[:, :1]).float()
    use_kernel_(model, "cpu", linears=True)
    assert any(isinstance(m, CpuLinear) for m in model.modules())
    with torch.no_grad():
        out = model(ids[:, :1]).float()
    # a bf16 model end to end (fp32 accumulation vs bf16 products): close at bf16's level, not bit-equal
    torch.testing.assert_close(out, ref, rtol=0, atol=0.05 * float(ref.abs().max()))


@pytest.mark.parametrize("variant", variant_params())
def test_gemv_takes_bf16_activations_as_the_widened_ones(variant):
    """Decode without a bias hands the bf16 row to the GEMV, which widens it and rounds the result: the
    same numbers as widening before and rounding after the fp32 GEMV."""
    require(variant)
    ops = native_ops()
    torch.manual_seed(1)
    w = torch.randn(300, 130).bfloat16()
    x = torch.randn(130).bfloat16()
    out = ops.gemv(x, w, variant)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ops.gemv(x.float(), w, variant).bfloat16())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.gemv(x.half(), w, variant)
