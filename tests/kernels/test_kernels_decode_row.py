"""The one-row forms of the native ops that batch-1 decode calls (csrc/ops.cpp `gemv`, `moe_decode`,
`linear_q_row`): each takes the activation row as the model holds it (fp32 or bf16, any leading dims of
size 1) and returns its output in that dtype and shape, so that no torch op runs around it. They are the
same arithmetic as the general forms they replace (widen the row to fp32, the product, round once), so
they are compared with torch.equal, every variant forced by name."""

from __future__ import annotations

import pytest
import torch

from moeinfer.formats.quant.groupwise import quantize
from native_helpers import native_ops, require, variant_params

DTYPES = [torch.float32, torch.bfloat16]


def rounded(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return y if y.dtype == dtype else y.to(dtype)


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("lead", [(), (1,), (1, 1)])
def test_gemv_takes_the_row_in_its_shape(variant, dtype, wdtype, lead):
    require(variant)
    ops = native_ops()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 36, generator=g).to(wdtype)
    x = torch.randn(*lead, 36, generator=g).to(dtype)
    y = ops.gemv(x, w, variant)
    assert y.shape == (*lead, 70) and y.dtype == dtype
    assert torch.equal(y, rounded(ops.gemv(x.reshape(-1).float(), w, variant), dtype).reshape(*lead, 70))


def test_gemv_refuses_more_than_one_row():
    ops = native_ops()
    with pytest.raises(RuntimeError, match="one contiguous row of 8"):
        ops.gemv(torch.randn(2, 8), torch.randn(4, 8), "generic")


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wdtype", DTYPES)
def test_moe_decode_takes_the_row_in_its_shape(variant, dtype, wdtype):
    """x [1, D] and the routing's [1, K] tensors as the MoE block holds them -> [1, D] in x's dtype."""
    require(variant)
    ops = native_ops()
    g = torch.Generator().manual_seed(1)
    E, K, D, I = 6, 3, 40, 24
    gate_up = (torch.randn(E, 2 * I, D, generator=g) / D**0.5).to(wdtype)
    down = (torch.randn(E, D, I, generator=g) / I**0.5).to(wdtype)
    x = torch.randn(1, D, generator=g).to(dtype)
    experts = torch.tensor([[4, -1, 1]])  # -1: an expert not held here is skipped
    weights = torch.rand(1, K, generator=g)
    y = ops.moe_decode(x, experts, weights, gate_up, down, variant)
    assert y.shape == (1, D) and y.dtype == dtype
    ref = ops.moe_decode(x[0].float(), experts[0], weights[0], gate_up, down, variant)
    assert torch.equal(y, rounded(ref, dtype)[None])


def packed(bits: int, gs: int, rows: int, cols: int, *, midpoints: bool):
    """Codes, fp32 scales and zeros (None with `midpoints`: the kernels' constant 2^(bits-1))."""
    g = torch.Generator().manual_seed(bits + cols)
    qt = quantize(torch.randn(rows, cols, generator=g), bits=bits, group_size=gs, algorithm="rtn")
    return qt.packed, qt.scale.float().contiguous(), None if midpoints else qt.zero.float().contiguous()


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("activations", ["q8", "f32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("midpoints", [False, True])
@pytest.mark.parametrize("cols", [64, 200])
def test_linear_q_row_is_gemm_q_at_one_row(variant, bits, activations, dtype, bias, midpoints, cols):
    """O = 50 (two work items of 24 rows and a partial one); cols 200: a partial last group."""
    require(variant)
    ops = native_ops()
    q, s, z = packed(bits, 32, 50, cols, midpoints=midpoints)
    b = torch.randn(50) if bias else None
    x = torch.randn(1, 1, cols).to(dtype)
    y = ops.linear_q_row(x, q, s, z, bits, 32, variant, activations, b)
    assert y.shape == (1, 1, 50) and y.dtype == dtype
    assert torch.equal(y, ops.gemm_q(x.view(1, cols), q, s, z, bits, 32, variant, activations, b).view(1, 1, 50))


def test_linear_q_row_refuses_bad_input_by_name():
    ops = native_ops()
    q, s, z = packed(4, 32, 8, 64, midpoints=False)
    with pytest.raises(RuntimeError, match="one contiguous row of 64"):
        ops.linear_q_row(torch.randn(2, 64), q, s, z, 4, 32, "generic", "q8", None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.linear_q_row(torch.randn(1, 64).half(), q, s, z, 4, 32, "generic", "q8", None)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        ops.linear_q_row(torch.randn(1, 64), q, s, z, 4, 32, "generic", "q8", torch.zeros(7))
    with pytest.raises(RuntimeError, match="scales must be float32 or float16 .* rows contiguous"):
        ops.linear_q_row(torch.randn(1, 64), q, s[:, :1], z, 4, 32, "generic", "q8", None)
