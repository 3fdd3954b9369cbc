"""The native quantized GEMM (`gemm_q`, csrc/kern.h: int8 activation rows x packed 4/8-bit codes, the
register-tiled microkernel on AVX2) and the quantized experts' prefill built on it (`moe_prefill_q`),
each variant forced by name, against their eager references (and on 1 and 2 threads: every output
element is computed by one thread in a fixed order, so the results are bit-equal):
- gemm_q "q8": the dequantized weight times the activation rows as quantize_q8 rounds them
  (q8_reference.q8_round_trip), in fp64; "f32": the dequantized weight times the rows themselves;
- moe_prefill_q: reference_moe_q8 (x quantized per token, SiLU * up per token and expert), with the
  rounding-tie allowance of test_kernels_native_q8.py.

Tolerances: 1e-5 of the output's scale (integer block products are exact; only the order of fp32
additions differs), so a 1% error fails; bf16 outputs at one bf16 rounding. Exact identities (one row
equals the row kernel, bias and bf16 handling) compare with torch.equal.
"""

from __future__ import annotations

import pytest
import torch

from moeinfer.formats.quant.groupwise import dequantize, quantize
from moeinfer.kernels import quantized_cpu
from moeinfer.kernels.q8_reference import q8_round_trip, quantize_q8, reference_moe_q8
from moeinfer.kernels.quantized_cpu import quantized_moe_cpu
from native_helpers import force_expert_path, native_ops, require, variant_params
from test_kernels_native import close, quantized_problem, routing
from test_kernels_native_q8 import assert_matches_q8_reference, codes_problem, tie_allowance


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def matrix(bits: int, gs: int, rows: int, cols: int, seed: int = 0):
    """Packed codes [rows, P], fp32 scales and zeros [rows, G], and the dequantized weight [rows, cols]."""
    g = torch.Generator().manual_seed(seed)
    qt = quantize(torch.randn(rows, cols, generator=g), bits=bits, group_size=gs, algorithm="rtn")
    s, z = qt.scale.float().contiguous(), qt.zero.float().contiguous()
    return qt.packed, s, z, dequantize(qt.packed, s, z, bits=bits, group_size=gs, cols=cols, dtype=torch.float32)


def q8_ref(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return (q8_round_trip(x).double() @ W.double().T).float()


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("cols", [36, 96, 200, 256], ids=["partial-block", "odd-blocks", "partial-group", "aligned"])
@pytest.mark.parametrize("N", [1, 3, 8, 9, 17, 64])
def test_gemm_q_matches_the_reference(variant, bits, gs, cols, N):
    """O = 50: two work items of 24 rows and a partial one, a partial tile of rows; N: partial tiles of
    activation rows; cols: a partial last block, an odd number of whole blocks (4-bit codes go two
    blocks at a time, the last one alone), a partial last group, whole groups."""
    ops = native_ops()
    require(variant)
    q, s, z, W = matrix(bits, gs, 50, cols)
    x = torch.randn(N, cols, generator=torch.Generator().manual_seed(N))
    close(ops.gemm_q(x, q, s, z, bits, gs, variant, "q8"), q8_ref(x, W), torch.float32)
    close(ops.gemm_q(x, q, s, z, bits, gs, variant, "f32"), (x.double() @ W.double().T).float(), torch.float32)


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [64, 200])
def test_extreme_codes_do_not_saturate(variant, bits, cols):
    """Rows of codes 0 / 15 or 255 / alternating against activation rows whose codes reach +-127 (the
    int16 pair sums vpmaddubsw would saturate on uncentred 8-bit codes)."""
    ops = native_ops()
    require(variant)
    packed, s, z, x0, W = codes_problem(bits, 32, cols, rows=26)
    x = torch.stack([x0, -x0, x0 * 1e-3, x0.flip(0), x0 * 40.0])  # [5, cols]
    ref = q8_ref(x, W)
    assert int(quantize_q8(x)[0].abs().max()) == 127
    close(ops.gemm_q(x, packed, s, z, bits, 32, variant, "q8"), ref, torch.float32)


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("bits", [4, 8])
def test_non_finite_rows_give_nan_and_leave_the_others(variant, bits):
    """As the row kernels: a row holding inf or NaN gives NaN everywhere (its block scale is NaN); the
    rows beside it in the same tile are unaffected."""
    ops = native_ops()
    require(variant)
    q, s, z, W = matrix(bits, 32, 30, 96)
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(5))
    x[2, 40], x[5, 3] = float("inf"), float("nan")
    y = ops.gemm_q(x, q, s, z, bits, 32, variant, "q8")
    assert bool(y[[2, 5]].isnan().all())
    good = [0, 1, 3, 4, 6]
    close(y[good], q8_ref(x[good], W), torch.float32)
    f32 = ops.gemm_q(x, q, s, z, bits, 32, variant, "f32")
    assert not bool(f32[[2, 5]].isfinite().any()) and bool(f32[good].isfinite().all())


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("activations", ["q8", "f32"])
def test_one_row_is_the_row_kernel(variant, bits, activations):
    """N = 1 runs gemv_q's row kernels (bit-equal); the same row inside a tile of the GEMM agrees with
    them up to fp32 summation order."""
    ops = native_ops()
    require(variant)
    q, s, z, _ = matrix(bits, 64, 41, 200)
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(1))
    row = ops.gemv_q(x[0], q, s, z, bits, 64, variant, activations)
    assert torch.equal(ops.gemm_q(x[:1], q, s, z, bits, 64, variant, activations)[0], row)
    close(ops.gemm_q(x, q, s, z, bits, 64, variant, activations)[0], row, torch.float32)


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("bits", [4, 8])
def test_tiles_do_not_change_any_sum(variant, bits):
    """Activation rows 2..9 go through different tile widths (3+3+3, 3+2+2, 2+2, ...): every output
    element is one tile's, accumulated in block order whatever the width, so the rows are bit-equal."""
    ops = native_ops()
    require(variant)
    q, s, z, _ = matrix(bits, 32, 30, 96)
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(2))
    full = ops.gemm_q(x, q, s, z, bits, 32, variant, "q8")
    for n in range(2, 9):
        assert torch.equal(ops.gemm_q(x[:n], q, s, z, bits, 32, variant, "q8"), full[:n]), n


@pytest.mark.parametrize("variant", variant_params())
def test_bias_bf16_rows_and_strided_weights(variant):
    ops = native_ops()
    require(variant)
    q, s, z, _ = matrix(4, 32, 30, 64)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(30)
    y = ops.gemm_q(x, q, s, z, 4, 32, variant, "q8")
    assert torch.equal(ops.gemm_q(x, q, s, z, 4, 32, variant, "q8", bias), y + bias)
    xb = x.bfloat16()
    yb = ops.gemm_q(xb, q, s, z, 4, 32, variant, "q8", bias)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, (ops.gemm_q(xb.float(), q, s, z, 4, 32, variant, "q8") + bias).bfloat16())
    assert ops.gemm_q(x[:0], q, s, z, 4, 32, variant, "q8").shape == (0, 30)
    strided = [t.t().contiguous().t() for t in (q, s, z)]  # the same values, not contiguous
    assert not strided[0].is_contiguous()
    assert torch.equal(ops.gemm_q(x, *strided, 4, 32, variant, "q8"), y)


def test_gemm_q_names_bad_input():
    ops = native_ops()
    q, s, z, _ = matrix(4, 32, 30, 64)
    x = torch.randn(5, 64)
    with pytest.raises(RuntimeError, match="gemm_q needs 8 or 4 bits, got 3"):
        ops.gemm_q(x, q, s, z, 3, 32, "generic", "q8")
    with pytest.raises(RuntimeError, match="int8 activations need a group size that is a multiple of 32"):
        ops.gemm_q(x, q, s, z, 4, 16, "generic", "q8")
    with pytest.raises(RuntimeError, match="gemm_q x must be a float32 or bfloat16 CPU matrix, got Half"):
        ops.gemm_q(x.half(), q, s, z, 4, 32, "generic", "q8")
    with pytest.raises(RuntimeError, match=r"gemm_q codes must be uint8 \[E, 30, 48\] with each expert.s rows contiguous"):
        ops.gemm_q(torch.randn(5, 96), q, s, z, 4, 32, "generic", "q8")
    with pytest.raises(RuntimeError, match=r"gemm_q bias must be float32 \[30\]"):
        ops.gemm_q(x, q, s, z, 4, 32, "generic", "q8", torch.zeros(29))


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("bits", [4, 8])
def test_thread_count_does_not_change_results(variant, bits, threads, monkeypatch):
    """The GEMM and the experts' prefill on 2 threads against the reference, and bit-equal to 1 thread."""
    ops = native_ops()
    require(variant)
    q, s, z, W = matrix(bits, 64, 100, 200)
    x = torch.randn(17, 200, generator=torch.Generator().manual_seed(8))
    force_expert_path(monkeypatch, "prefill")
    qe = quantized_problem(bits, 32, "rtn", d=160, i=96)
    r = routing(33, 8, 3)
    xe = torch.randn(33, 160, generator=torch.Generator().manual_seed(2))

    def run():
        return (ops.gemm_q(x, q, s, z, bits, 64, variant, "q8"),
                quantized_moe_cpu(xe, r.indices, r.weights, qe, engine=variant, activations="q8"))

    y, out = run()
    close(y, q8_ref(x, W), torch.float32)
    gate_up, down = qe.dequantize_all()
    ref = reference_moe_q8(xe, r.indices, r.weights, gate_up, down)
    allow = tie_allowance(xe, r.indices, r.weights, gate_up, down)
    assert not bool(((out - ref).abs() > 1e-5 * float(ref.abs().max()) + 1e-5 * ref.abs() + allow).any())
    torch.set_num_threads(3 - threads)
    y2, out2 = run()
    assert torch.equal(y, y2) and torch.equal(out, out2)


# --- quantized experts' prefill (moe_prefill_q) ---

@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("bits,gs,algorithm", [(8, 128, "rtn"), (4, 128, "rtn"), (8, 32, "sym"), (4, 32, "sym"),
                                               (4, 64, "rtn")])
@pytest.mark.parametrize("d,i", [(36, 20), (64, 32), (160, 96)], ids=["unaligned", "aligned", "wider"])
@pytest.mark.parametrize("N", [5, 33])
def test_prefill_matches_the_reference(variant, bits, gs, algorithm, d, i, N, monkeypatch):
    require(variant)
    force_expert_path(monkeypatch, "prefill")
    if algorithm == "sym" and (d % gs or i % gs):
        d, i = 64, 32  # the symmetric formats need whole groups
    qe = quantized_problem(bits, gs, algorithm, d=d, i=i)
    r = routing(N, 8, 3)
    x = torch.randn(N, d, generator=torch.Generator().manual_seed(2))
    out = quantized_moe_cpu(x, r.indices, r.weights, qe, engine=variant, activations="q8")
    assert_matches_q8_reference(out, x, r, qe)
    # bf16 rows: the same computation on the bf16-rounded rows, one bf16 rounding at the end
    xb = x.bfloat16()
    out_b = quantized_moe_cpu(xb, r.indices, r.weights, qe, engine=variant, activations="q8")
    close(out_b, quantized_moe_cpu(xb.float(), r.indices, r.weights, qe, engine=variant, activations="q8"),
          torch.bfloat16)


@pytest.mark.parametrize("variant", variant_params())
def test_prefill_of_mixed_widths_and_empty_experts(variant, monkeypatch):
    """Two bit widths (one call each, experts of the other width skipped), experts without tokens, and
    the bf16 model's path; one call per width and nothing else per expert."""
    require(variant)
    force_expert_path(monkeypatch, "prefill")
    qe = quantized_problem(4, 32, "rtn", d=64, i=48, E=16, mixed=True)
    r = routing(6, 6, 2)  # experts 6..15 get no token
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
    ops = native_ops()
    calls = []
    real = ops.moe_prefill_q

    class Counting:
        def __getattr__(self, name):
            return getattr(ops, name)

        def moe_prefill_q(self, *a):
            calls.append(a[9])
            return real(*a)

    monkeypatch.setattr(quantized_cpu.native, "load", lambda: Counting())
    out = quantized_moe_cpu(x, r.indices, r.weights, qe, engine=variant, activations="q8")
    assert sorted(calls) == [4, 8]
    gate_up, down = qe.dequantize_all()
    ref = reference_moe_q8(x, r.indices, r.weights, gate_up, down)
    allow = tie_allowance(x, r.indices, r.weights, gate_up, down)
    assert not bool(((out - ref).abs() > 1e-5 * float(ref.abs().max()) + 1e-5 * ref.abs() + allow).any())


def test_prefill_activation_choice(monkeypatch):
    """"q8" prefill is the int8 GEMM (the q8 reference); "f32" keeps the dequantized tiles (the fp32
    reference up to summation order); groups that are not whole blocks take "f32"."""
    native_ops()
    force_expert_path(monkeypatch, "prefill")
    qe = quantized_problem(4, 128, "rtn", d=160, i=96)
    r = routing(5, 8, 3)
    x = torch.randn(5, 160)
    q8 = quantized_moe_cpu(x, r.indices, r.weights, qe, activations="q8")
    f32 = quantized_moe_cpu(x, r.indices, r.weights, qe, activations="f32")
    close(f32, qe.eager_forward(x, r), torch.float32)
    gate_up, down = qe.dequantize_all()
    ref = reference_moe_q8(x, r.indices, r.weights, gate_up, down)
    allow = tie_allowance(x, r.indices, r.weights, gate_up, down)
    assert not bool(((q8 - ref).abs() > 1e-5 * float(ref.abs().max()) + 1e-5 * ref.abs() + allow).any())
    assert not torch.allclose(q8, f32, atol=1e-5 * float(f32.abs().max()), rtol=0)
    odd = quantized_problem(8, 48, "rtn", d=96, i=48)
    x3 = torch.randn(9, 96)
    r3 = routing(9, 8, 2)
    close(odd(x3, r3), odd.eager_forward(x3, r3), torch.float32)


def test_moe_prefill_q_names_bad_input():
    ops = native_ops()
    qe = quantized_problem(4, 32, "rtn", d=64, i=32)
    stack = [getattr(qe, f"{p}4_{m}") for m in ("gate_up", "down") for p in "qsz"]
    r = routing(3, 8, 2)
    x = torch.randn(3, 64)
    with pytest.raises(RuntimeError, match="needs a group size that is a multiple of 32, got 48"):
        ops.moe_prefill_q(x, r.indices, r.weights, *stack, 4, 48, 64, 32, "generic")
    with pytest.raises(RuntimeError, match="x has 60 columns, the experts 64"):
        ops.moe_prefill_q(x[:, :60], r.indices, r.weights, *stack, 4, 32, 64, 32, "generic")
    with pytest.raises(RuntimeError, match=r"experts and weights must both be \[3, K\]"):
        ops.moe_prefill_q(x, r.indices[:2], r.weights, *stack, 4, 32, 64, 32, "generic")
    with pytest.raises(RuntimeError, match="expert row 9 out of range"):
        ops.moe_prefill_q(x, torch.full((3, 2), 9), r.weights, *stack, 4, 32, 64, 32, "generic")
    assert torch.equal(ops.moe_prefill_q(x, torch.full((3, 2), -1), r.weights, *stack, 4, 32, 64, 32, "generic"),
                       torch.zeros(3, 64))

