"""fp16 group scales (csrc/ops.cpp QMat, kern.h Scales): the symmetric block formats round their scales
to fp16 (as GGUF's Q8_0/Q4_0 store them), so the native kernels may read them as fp16, 2 bytes a group
instead of 4. fp16 widens to fp32 exactly, so every op must give, bit for bit, what the same scales
give in fp32: the row kernels (one row and four at once), the tiled GEMM, the experts' decode and
prefill, the dequantized tile; each variant forced by name, on shapes that take every scale read
(one, four and eight scales at a time, group sizes of one and two blocks, a partial last block) and
on scale values that test the widening (fp16 subnormals, the largest fp16, negative scales)."""

from __future__ import annotations

import pytest
import torch

from moeinfer.formats.quant.packing import packed_cols
from moeinfer.kernels import quantized_cpu
from moeinfer.kernels.quantized_cpu import read_scales
from native_helpers import experts_decode_and_prefill, native_ops, require, variant_params
from test_kernels_native import quantized_problem


def half_exact(rows: int, groups: int, seed: int) -> torch.Tensor:
    """fp32 scales that are fp16 values, with fp16 subnormals, the largest fp16 and negative ones."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(rows, groups, generator=g) * 0.05).half()
    s.view(-1)[::7] = torch.tensor(2.0**-20, dtype=torch.float16)  # subnormal
    s.view(-1)[3::11] = -s.view(-1)[3::11]
    s.view(-1)[5] = 65504.0
    return s.float()


def matrix(bits: int, rows: int, cols: int, gs: int, *, zeros: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    G = -(-cols // gs)
    q = torch.randint(0, 256, (rows, packed_cols(cols, bits)), dtype=torch.uint8, generator=g)
    z = torch.randint(0, 2**bits, (rows, G), generator=g).float() if zeros else None
    return q, half_exact(rows, G, seed + 1), z


SHAPES = [(320, 32), (320, 64), (300, 32)]  # ten groups of one block, five of two, a partial last block


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("activations", ["f32", "q8"])
@pytest.mark.parametrize("cols,gs", SHAPES, ids=[f"c{c}g{g}" for c, g in SHAPES])
@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
def test_linear_ops_read_fp16_scales_as_fp32(variant, bits, activations, cols, gs, zeros):
    require(variant)
    ops = native_ops()
    q, s, z = matrix(bits, 37, cols, gs, zeros=zeros)  # 37 rows: runs of four and single rows
    h = s.half()
    x = torch.randn(6, cols, generator=torch.Generator().manual_seed(2))
    for n in (1, 6):  # the row kernels, then the GEMM (q8) or the rows in turn (f32)
        want = ops.gemm_q(x[:n], q, s, z, bits, gs, variant, activations, None)
        assert torch.equal(ops.gemm_q(x[:n], q, h, z, bits, gs, variant, activations, None), want)
    assert torch.equal(ops.gemv_q(x[0], q, h, z, bits, gs, variant, activations),
                       ops.gemv_q(x[0], q, s, z, bits, gs, variant, activations))
    xb = x[:1].bfloat16()
    assert torch.equal(ops.linear_q_row(xb, q, h, z, bits, gs, variant, activations, None),
                       ops.linear_q_row(xb, q, s, z, bits, gs, variant, activations, None))
    # the test can fail: one scale changed by one fp16 step changes the output
    h2 = h.clone()
    h2[4, 1] = torch.nextafter(h2[4, 1], torch.tensor(1.0, dtype=torch.float16))
    assert not torch.equal(ops.gemm_q(x, q, h2, z, bits, gs, variant, activations, None),
                           ops.gemm_q(x, q, s, z, bits, gs, variant, activations, None))


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("activations", ["f32", "q8"])
def test_experts_read_fp16_scales_as_fp32(variant, bits, activations):
    require(variant)
    ops = native_ops()
    qe = quantized_problem(bits, 32, "sym", d=320, i=96)
    q_gu, s_gu, z_gu, q_dn, s_dn, z_dn = quantized_cpu._stack(qe, bits, midpoints=False)
    assert s_gu.dtype == torch.float32
    h_gu, h_dn = s_gu.half(), s_dn.half()
    assert torch.equal(h_gu.float(), s_gu) and torch.equal(h_dn.float(), s_dn)  # the symmetric storage's scales
    for zg, zd in ((None, None), (z_gu, z_dn)):
        half = experts_decode_and_prefill(ops, (q_gu, h_gu, zg, q_dn, h_dn, zd), bits, 320, 96, variant, activations)
        full = experts_decode_and_prefill(ops, (q_gu, s_gu, zg, q_dn, s_dn, zd), bits, 320, 96, variant, activations)
        assert torch.equal(half[0], full[0]) and torch.equal(half[1], full[1])


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_tile_reads_fp16_scales(bits):
    ops = native_ops()
    q, s, z = matrix(bits, 9, 300, 32, zeros=True)
    a, b = torch.empty(9, 300), torch.empty(9, 300)
    ops.dequant_into(q, s.half(), z, bits, 32, a)
    ops.dequant_into(q, s, z, bits, 32, b)
    assert torch.equal(a, b)


def test_other_scale_dtypes_are_refused_by_name():
    ops = native_ops()
    q, s, _ = matrix(4, 8, 64, 32, zeros=False)
    with pytest.raises(RuntimeError, match="scales must be float32 or float16 "):
        ops.gemv_q(torch.randn(64), q, s.bfloat16(), None, 4, 32, "generic", "q8")


def test_read_scales_gives_fp16_only_where_exact_and_sees_changes():
    s = half_exact(8, 10, 0)
    h = read_scales(s)
    assert h.dtype == torch.float16 and torch.equal(h.float(), s)
    assert read_scales(s) is h  # kept on the tensor
    s[2, 3] = 0.1  # not an fp16 value: an in-place change is seen (tensor version)
    assert read_scales(s) is s
    rnd = torch.rand(8, 10)
    assert read_scales(rnd) is rnd
    assert read_scales(h) is h  # already fp16
    with torch.inference_mode():  # no version counter: read as is
        si = half_exact(8, 10, 1)
        assert read_scales(si) is si


def test_symmetric_experts_run_on_fp16_scales():
    """The stacks the native decode and prefill receive for Q4_0-style experts hold fp16 scales."""
    qe = quantized_problem(4, 32, "sym", d=64, i=32)
    stack = quantized_cpu._stack(qe, 4)
    assert stack[1].dtype == torch.float16 and stack[4].dtype == torch.float16
    assert stack[2] is None and stack[5] is None
    asym = quantized_problem(4, 32, "rtn", d=64, i=32)  # rtn scales are not fp16 values: kept fp32
    assert quantized_cpu._stack(asym, 4)[1].dtype == torch.float32
