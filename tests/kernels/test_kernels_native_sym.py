"""Symmetric storage (Q8_0/Q4_0: every zero-point at the midpoint 2^(bits-1)): the native quantized
kernels take its zeros as None and use the constant without reading them (csrc/kern.h). The outputs
must equal, bit for bit, those computed from the stored zeros, on every kernel that reads zeros: the
row kernels (gemv_q / gemm_q at one row, fp32 and int8 activations), the tiled GEMM (gemm_q at many
rows), the experts' decode (moe_decode_q) and prefill (moe_prefill_q); each variant forced by name."""

from __future__ import annotations

import pytest
import torch

from moeinfer.formats.quant.groupwise import quantize
from moeinfer.kernels import quantized_cpu
from moeinfer.kernels.quantized_cpu import read_zeros
from native_helpers import experts_decode_and_prefill, native_ops, require, variant_params
from test_kernels_native import quantized_problem


def sym_matrix(bits: int, rows: int, cols: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qt = quantize(torch.randn(rows, cols, generator=g), bits=bits, group_size=32, algorithm="sym")
    z = qt.zero.float().contiguous()
    assert bool((z == 2 ** (bits - 1)).all())
    return qt.packed, qt.scale.float().contiguous(), z


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("activations", ["f32", "q8"])
@pytest.mark.parametrize("n", [1, 5])
def test_linear_without_zeros_equals_with_them(variant, bits, activations, n):
    require(variant)
    ops = native_ops()
    q, s, z = sym_matrix(bits, 40, 96)
    x = torch.randn(n, 96, generator=torch.Generator().manual_seed(3))
    with_z = ops.gemm_q(x, q, s, z, bits, 32, variant, activations, None)
    assert torch.equal(ops.gemm_q(x, q, s, None, bits, 32, variant, activations, None), with_z)
    assert torch.equal(ops.gemv_q(x[0], q, s, None, bits, 32, variant, activations),
                       ops.gemv_q(x[0], q, s, z, bits, 32, variant, activations))
    # a wrong midpoint would show: the stored zeros moved by one step change the output
    assert not torch.equal(ops.gemm_q(x, q, s, z + 1, bits, 32, variant, activations, None), with_z)


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("activations", ["f32", "q8"])
def test_experts_without_zeros_equal_with_them(variant, bits, activations):
    require(variant)
    ops = native_ops()
    qe = quantized_problem(bits, 32, "sym", d=64, i=32)
    q_gu, s_gu, z_gu, q_dn, s_dn, z_dn = quantized_cpu._stack(qe, bits, midpoints=False)
    without = experts_decode_and_prefill(ops, (q_gu, s_gu, None, q_dn, s_dn, None), bits, 64, 32, variant, activations)
    with_z = experts_decode_and_prefill(ops, (q_gu, s_gu, z_gu, q_dn, s_dn, z_dn), bits, 64, 32, variant, activations)
    assert torch.equal(without[0], with_z[0]) and torch.equal(without[1], with_z[1])


def test_read_zeros_drops_only_midpoints_and_sees_changes():
    _, _, z = sym_matrix(4, 8, 64)
    assert read_zeros(z, 4) is None
    assert read_zeros(z, 8) is z  # 8 is not the 8-bit midpoint
    z[3, 1] = 7.0  # an in-place change is seen (tensor version)
    assert read_zeros(z, 4) is z
    asym = quantize(torch.randn(8, 64), bits=4, group_size=32, algorithm="rtn").zero.float()
    assert read_zeros(asym, 4) is asym
    with torch.inference_mode():  # no version counter: checked every time
        _, _, zi = sym_matrix(4, 8, 64)
        assert read_zeros(zi, 4) is None
        zi[0, 0] = 3.0
        assert read_zeros(zi, 4) is zi
