"""Batch-1 row products in interleaved runs (csrc/ops.cpp `in_runs`, kern.h's four-row kernels): a
thread's rows are read four (or two gate/up pairs) at a time from distant parts of its share, so which
rows go through a four-row kernel and which through the one-row kernel depends on the matrix's height
and the thread count. Every four-row kernel computes each row in the one-row kernel's order, so every
output must be bit-equal however the rows were grouped: compared with torch.equal.
"""

from __future__ import annotations

import pytest
import torch

from native_helpers import native_ops, require, variant_params
from test_kernels_native_gemm import threads  # noqa: F401 (the 1- and 2-thread fixture)

HEIGHTS = range(1, 11)  # 0-2 four-row runs and 0-3 single rows


def float_experts(dtype: torch.dtype, *, seed: int, E: int, D: int, I: int):
    """Random gate_up [E, 2I, D] and down [E, D, I] in `dtype`, an fp32 x [D], and the generator."""
    g = torch.Generator().manual_seed(seed)
    gu, dn = torch.randn(E, 2 * I, D, generator=g).to(dtype), torch.randn(E, D, I, generator=g).to(dtype)
    return gu, dn, torch.randn(D, generator=g), g


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [40, 200])  # a tail of 8 and a scalar tail
def test_gemv_rows_do_not_depend_on_grouping(variant, dtype, cols, threads):
    ops = native_ops()
    require(variant)
    g = torch.Generator().manual_seed(cols)
    x, w = torch.randn(cols, generator=g), torch.randn(max(HEIGHTS), cols, generator=g).to(dtype)
    full = ops.gemv(x, w, variant)
    for n in HEIGHTS:
        assert torch.equal(ops.gemv(x, w[:n].contiguous(), variant), full[:n]), n


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64])
def test_quantized_rows_do_not_depend_on_grouping(variant, bits, gs, threads):
    ops = native_ops()
    require(variant)
    g = torch.Generator().manual_seed(bits + gs)
    cols = 200  # pairs of blocks, a partial block
    q = torch.randint(0, 256, (max(HEIGHTS), cols // 2 if bits == 4 else cols), dtype=torch.uint8, generator=g)
    s = torch.rand(max(HEIGHTS), -(-cols // gs), generator=g)
    x = torch.randn(cols, generator=g)
    full = ops.gemv_q(x, q, s, None, bits, gs, variant, "q8")
    assert torch.equal(ops.gemm_q(x[None], q, s, None, bits, gs, variant, "q8", None)[0], full)
    for n in HEIGHTS:
        assert torch.equal(ops.gemv_q(x, q[:n].contiguous(), s[:n].contiguous(), None, bits, gs, variant, "q8"),
                           full[:n]), n


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_do_not_depend_on_grouping(variant, dtype, threads):
    """One routed expert alone, then beside others (the gate/up runs pair rows of different experts),
    skipped slots included: its output is the same bits (the down sums follow the routing order)."""
    ops = native_ops()
    require(variant)
    gu, dn, x, _ = float_experts(dtype, seed=3, E=5, D=64, I=36)
    one = ops.moe_decode(x, torch.tensor([2]), torch.tensor([1.0]), gu, dn, variant)
    for experts in ([2, -1], [2, 0, 4], [2, -1, 3, 1]):
        w = torch.tensor([1.0] + [0.0] * (len(experts) - 1))
        assert torch.equal(ops.moe_decode(x, torch.tensor(experts), w, gu, dn, variant), one), experts


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_experts_do_not_depend_on_grouping(variant, bits, threads):
    ops = native_ops()
    require(variant)
    g = torch.Generator().manual_seed(bits)
    E, D, I = 5, 96, 64
    qgu = torch.randint(0, 256, (E, 2 * I, D // 2 if bits == 4 else D), dtype=torch.uint8, generator=g)
    qdn = torch.randint(0, 256, (E, D, I // 2 if bits == 4 else I), dtype=torch.uint8, generator=g)
    sgu, sdn = torch.rand(E, 2 * I, D // 32, generator=g), torch.rand(E, D, I // 32, generator=g)
    x = torch.randn(D, generator=g)

    def run(experts):
        w = torch.tensor([1.0] + [0.0] * (len(experts) - 1))
        return ops.moe_decode_q(x, torch.tensor(experts), w, qgu, sgu, None, qdn, sdn, None, bits, 32, D, I, variant,
                                "q8")

    one = run([2])
    for experts in ([2, -1], [2, 0, 4], [2, -1, 3, 1]):
        assert torch.equal(run(experts), one), experts


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_sum_single_experts_in_routing_order(variant, dtype, threads):
    """The K routed experts' outputs (each alone with weight 1: that expert's output, exactly) summed
    with their weights in routing order, one fp32 rounding per product and per sum, give the op's bits:
    however the down rows were read, the sum is the row-by-row loop's."""
    ops = native_ops()
    require(variant)
    gu, dn, x, g = float_experts(dtype, seed=4, E=6, D=72, I=40)
    experts, w = [4, 1, -1, 5, 0], torch.rand(5, generator=g)
    acc = torch.zeros(x.shape[0])
    for e, wk in zip(experts, w):
        if e >= 0:
            acc = acc + wk * ops.moe_decode(x, torch.tensor([e]), torch.tensor([1.0]), gu, dn, variant)
    assert torch.equal(ops.moe_decode(x, torch.tensor(experts), w, gu, dn, variant), acc)
