"""QuantizedLinear (the "-all" presets' attention, dense MLPs, LM head) on the native quantized GEMM
(`gemm_q`), against its eager reference (the whole weight dequantized, one matmul); int8 activations
against the same math on the activation rows as the kernel quantizes them (q8_reference), at decode
and prefill sizes; fp32 activations on the row kernels up to LINEAR_MAX_ROWS rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import tolerance
from native_helpers import native_ops

from moeinfer.formats.quantized_linear import QuantizedLinear
from moeinfer.kernels.q8_reference import q8_round_trip
from moeinfer.kernels.quantized_cpu import LINEAR_MAX_ROWS


def layer(bits: int, gs: int, *, cols: int = 192, out: int = 72, bias: bool = True) -> QuantizedLinear:
    g = torch.Generator().manual_seed(bits * 100 + gs)
    lin = torch.nn.Linear(cols, out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, cols, generator=g) / cols**0.5)
        if bias:
            lin.bias.copy_(torch.randn(out, generator=g))
    return QuantizedLinear.from_linear(lin, bits=bits, group_size=gs, algorithm="rtn")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 128])
@pytest.mark.parametrize("rows", [1, 3, 9, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_native_rows_match_the_reference(bits, gs, rows, bias, monkeypatch):
    native_ops()
    m = layer(bits, gs, bias=bias)
    x = torch.randn(2, rows, 192, generator=torch.Generator().manual_seed(rows))
    calls = []
    import moeinfer.formats.quantized_linear as ql
    real = ql.quantized_linear_cpu
    monkeypatch.setattr(ql, "quantized_linear_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = m.dequantized(torch.float32)
    b = m.bias if bias else None
    # fp32 activations: the eager reference up to fp32 summation order
    m.cpu_activations = "f32"
    ref = m.eager_forward(x)
    out = m(x)
    assert out.shape == ref.shape == (2, rows, 72) and calls
    torch.testing.assert_close(out, ref, atol=tolerance(ref, torch.float32), rtol=0)
    # int8 activations: the same matmul on the activation rows as the kernel rounds them
    m.cpu_activations = "q8"
    ref_q8 = F.linear(torch.stack([q8_round_trip(r) for r in x.reshape(-1, 192)]), w, b).reshape(2, rows, 72)
    torch.testing.assert_close(m(x), ref_q8, atol=tolerance(ref_q8, torch.float32), rtol=0)
    assert not torch.allclose(ref_q8, ref, atol=tolerance(ref, torch.float32), rtol=0)  # the two differ


def test_many_rows_of_fp32_activations_and_the_eager_kernel_take_the_reference():
    native_ops()
    m = layer(4, 32)
    m.cpu_activations = "f32"
    x = torch.randn(LINEAR_MAX_ROWS + 1, 192)
    assert torch.equal(m(x), m.eager_forward(x))
    m.cpu_activations = None  # "q8": the GEMM at any number of rows
    assert not torch.equal(m(x), m.eager_forward(x))
    m.kernel = "eager"
    assert torch.equal(m(x[:1]), m.eager_forward(x[:1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_one_is_one_native_call(dtype):
    """Decode calls every QuantizedLinear once per token: the torch calls it makes from Python are the
    input's size and layout checks and the native one-row product (quantization, bias, output shape and
    dtype inside; parameter reads aside)."""
    from torch.overrides import TorchFunctionMode

    native_ops()

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            if name != "__get__":
                self.names.append(name)
            return func(*args, **(kwargs or {}))

    m = layer(4, 32)
    x = torch.randn(1, 1, 192).to(dtype)
    ref = m(x)
    with Calls() as seen:
        y = m(x)
    assert torch.equal(y, ref) and y.dtype == dtype
    assert seen.names == ["numel", "contiguous", "linear_q_row"]


def test_bf16_activations_within_bf16_tolerance():
    native_ops()
    m = layer(8, 128)
    m.cpu_activations = "f32"
    x = torch.randn(1, 192).to(torch.bfloat16)
    ref = m.eager_forward(x.float())
    out = m(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=tolerance(ref, torch.bfloat16), rtol=0)
