"""Native decode ops over stacks whose experts lie apart, and the decode and the quantized prefill split
in two (csrc/ops.cpp QMat, `moe_decode_q_rows`, `moe_decode_rows`, `combine_rows`, `moe_prefill_q_rows`,
`combine_token_rows`; csrc/moe_rows.cpp `moe_rows_rows`). An offload cache's quantized slots are byte blobs
holding an expert's codes, scales and zeros back to back (moeinfer.offload.packed); seen across the
slots each part is a strided stack, every expert's rows contiguous. The kernels must read such a stack
exactly as the contiguous one (torch.equal, decode and prefill), and the per-expert rows plus their
sum must be the one-call decode (prefill: the per-(token, k) rows, the one-call `moe_prefill_q`) bit
for bit, each row the same whichever other experts a call holds. Each variant forced by name; asymmetric codes and symmetric ones (zeros not read)."""

from __future__ import annotations

import pytest
import torch

from moeinfer.kernels.quantized_cpu import _stack
from moeinfer.offload.packed import PackedFormat, SlotStack, midpoint_zeros
from native_helpers import experts_decode_and_prefill, native_ops, require, variant_params
from test_kernels_native import quantized_problem

D, I = 64, 32
ROUTED = torch.tensor([3, 0, 6, 5, 1])


def _stacks(bits: int, algorithm: str):
    """The experts' own contiguous stack and the same experts as strided views of their blobs."""
    qe = quantized_problem(bits, 32, algorithm, d=D, i=I)
    assert qe.slot == list(range(qe.num_experts))
    fmt = PackedFormat.of(qe)
    gate_up, down = fmt.stacked(qe)
    symmetric = midpoint_zeros(qe)
    assert symmetric == (algorithm == "sym")
    slots = SlotStack(fmt, gate_up, down, midpoints=symmetric)
    strided = _stack(slots, bits)
    assert not strided[0].is_contiguous() and strided[0].stride(0) == gate_up.shape[1]
    contiguous = [getattr(qe, f"{p}{bits}_{m}") for m in ("gate_up", "down") for p in "qsz"]
    if symmetric:
        contiguous[2] = contiguous[5] = None
        assert strided[2] is None and strided[5] is None
    return contiguous, strided


def quantized_cases(test):
    """Every native variant (forced by name), both widths, both forms of activations, asymmetric and
    symmetric codes."""
    for name, values in (("algorithm", ["rtn", "sym"]), ("activations", ["f32", "q8"]), ("bits", [4, 8]),
                         ("variant", variant_params())):
        test = pytest.mark.parametrize(name, values)(test)
    return test


@quantized_cases
def test_a_strided_stack_reads_as_the_contiguous_one(variant, bits, activations, algorithm):
    require(variant)
    ops = native_ops()
    contiguous, strided = _stacks(bits, algorithm)
    want = experts_decode_and_prefill(ops, contiguous, bits, D, I, variant, activations)
    got = experts_decode_and_prefill(ops, strided, bits, D, I, variant, activations)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@quantized_cases
def test_quantized_rows_then_their_sum_are_the_one_call_decode(variant, bits, activations, algorithm):
    require(variant)
    ops = native_ops()
    _, stack = _stacks(bits, algorithm)
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(D, generator=g), torch.rand(len(ROUTED), generator=g)
    want = ops.moe_decode_q(x, ROUTED, w, *stack, bits, 32, D, I, variant, activations)
    whole = torch.zeros(len(ROUTED), D)
    ops.moe_decode_q_rows(x, ROUTED, *stack, bits, 32, D, I, variant, activations, whole)
    parts = torch.full((len(ROUTED), D), float("nan"))
    for held in ([0, 2, 4], [1], [3]):  # the rows in three calls, the others skipped (-1)
        rows = torch.tensor([int(ROUTED[k]) if k in held else -1 for k in range(len(ROUTED))])
        ops.moe_decode_q_rows(x, rows, *stack, bits, 32, D, I, variant, activations, parts)
    assert torch.equal(parts, whole)
    assert torch.equal(ops.combine_rows(x, ROUTED, w, parts), want)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("algorithm", ["rtn", "sym"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("variant", variant_params())
def test_prefill_rows_then_their_sum_are_the_one_call_prefill(variant, bits, algorithm, x_dtype):
    require(variant)
    ops = native_ops()
    _, stack = _stacks(bits, algorithm)
    g = torch.Generator().manual_seed(7)
    N, K = 24, 2
    x = torch.randn(N, D, generator=g).to(x_dtype)
    experts = torch.randint(0, 8, (N, K), generator=g)
    w = torch.rand(N, K, generator=g)
    want = ops.moe_prefill_q(x, experts, w, *stack, bits, 32, D, I, variant)
    parts = torch.full((N * K, D), float("nan"))
    for held in ([0, 5, 6], [1, 2, 3, 7], [4]):  # the experts in three calls, the others skipped (-1)
        mask = torch.isin(experts, torch.tensor(held))
        ops.moe_prefill_q_rows(x, torch.where(mask, experts, -1), *stack, bits, 32, D, I, variant, parts)
    assert not parts.isnan().any()
    got = ops.combine_token_rows(x, experts, w, parts)
    assert got.dtype == torch.float32 and got.shape == (N, D)
    assert torch.equal(got, want)
    # skipped (token, k) take no part in the sum, whatever their rows hold
    skip = experts.clone()
    skip[3, 1] = skip[10, 0] = -1
    assert torch.equal(ops.combine_token_rows(x, skip, w, parts), ops.moe_prefill_q(x, skip, w, *stack, bits, 32, D, I,
                                                                                     variant))


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_float_token_rows_then_their_sum_are_the_one_call_moe_rows(variant, dtype):
    require(variant)
    ops = native_ops()
    g = torch.Generator().manual_seed(8)
    gate_up = (torch.randn(8, 2 * I, D, generator=g) / D**0.5).to(dtype)
    down = (torch.randn(8, D, I, generator=g) / I**0.5).to(dtype)
    N, K = 24, 2
    x = torch.randn(N, D, generator=g)
    experts = torch.randint(0, 8, (N, K), generator=g)
    w = torch.rand(N, K, generator=g)
    want = ops.moe_rows(x, experts, w, gate_up, down, variant)
    parts = torch.full((N * K, D), float("nan"))
    for held in ([2, 3], [0, 1, 4, 7], [5, 6]):  # the experts in three calls, the others skipped (-1)
        mask = torch.isin(experts, torch.tensor(held))
        ops.moe_rows_rows(x, torch.where(mask, experts, -1), gate_up, down, variant, parts)
    assert not parts.isnan().any()
    assert torch.equal(ops.combine_token_rows(x, experts, w, parts), want)
    with pytest.raises(RuntimeError, match=r"rows must be a contiguous float32 \[48, 64\] buffer"):
        ops.moe_rows_rows(x, experts, gate_up, down, variant, torch.zeros(N, D))


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_float_rows_then_their_sum_are_the_one_call_decode(variant, dtype, x_dtype):
    require(variant)
    ops = native_ops()
    g = torch.Generator().manual_seed(6)
    gate_up = (torch.randn(8, 2 * I, D, generator=g) / D**0.5).to(dtype)
    down = (torch.randn(8, D, I, generator=g) / I**0.5).to(dtype)
    x, w = torch.randn(1, D, generator=g).to(x_dtype), torch.rand(len(ROUTED), generator=g)
    want = ops.moe_decode(x, ROUTED, w, gate_up, down, variant)
    parts = torch.full((len(ROUTED), D), float("nan"))
    for held in ([4, 1], [0, 2, 3]):
        rows = torch.tensor([int(ROUTED[k]) if k in held else -1 for k in range(len(ROUTED))])
        ops.moe_decode_rows(x, rows, gate_up, down, variant, parts)
    got = ops.combine_rows(x, ROUTED, w, parts)
    assert got.dtype == x_dtype and got.shape == x.shape
    assert torch.equal(got, want)
    # skipped experts (-1) take no part in the sum, whatever their rows hold
    skip = ROUTED.clone()
    skip[2] = -1
    assert torch.equal(ops.combine_rows(x, skip, w, parts), ops.moe_decode(x, skip, w, gate_up, down, variant))


def test_bad_buffers_and_stacks_are_refused_by_name():
    ops = native_ops()
    contiguous, strided = _stacks(4, "rtn")
    x = torch.randn(D)
    with pytest.raises(RuntimeError, match=r"rows must be a contiguous float32 \[5, 64\] buffer"):
        ops.moe_decode_q_rows(x, ROUTED, *strided, 4, 32, D, I, "generic", "f32", torch.zeros(4, D))
    with pytest.raises(RuntimeError, match=r"rows must be a contiguous float32 \[5, 64\] buffer"):
        ops.combine_rows(x[None], ROUTED, torch.rand(5), torch.zeros(5, D, dtype=torch.float64))
    q = contiguous[0].transpose(1, 2).contiguous().transpose(1, 2)  # the right shape, rows not contiguous
    with pytest.raises(RuntimeError, match="codes must be uint8 .* with each expert's rows contiguous"):
        ops.moe_decode_q(x, ROUTED, torch.rand(5), q, *contiguous[1:], 4, 32, D, I, "generic", "f32")
    with pytest.raises(RuntimeError, match="expert row 8 out of range"):
        ops.moe_decode_q_rows(x, torch.tensor([8]), *strided, 4, 32, D, I, "generic", "f32", torch.zeros(1, D))
    xs, experts = torch.randn(3, D), torch.tensor([[0, 1], [2, 3], [4, 5]])
    with pytest.raises(RuntimeError, match=r"rows must be a contiguous float32 \[6, 64\] buffer \(N \* K rows\)"):
        ops.moe_prefill_q_rows(xs, experts, *strided, 4, 32, D, I, "generic", torch.zeros(3, D))
    with pytest.raises(RuntimeError, match=r"rows must be a contiguous float32 \[6, 64\] buffer"):
        ops.combine_token_rows(xs, experts, torch.rand(3, 2), torch.zeros(6, D, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"experts and weights must both be \[3, K\]"):
        ops.combine_token_rows(xs, experts, torch.rand(3, 1), torch.zeros(6, D))
    with pytest.raises(RuntimeError, match="expert row 8 out of range"):
        ops.moe_prefill_q_rows(xs, experts + 3, *strided, 4, 32, D, I, "generic", torch.zeros(6, D))
