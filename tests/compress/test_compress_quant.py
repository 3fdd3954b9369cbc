"""Packing, group-wise quantization (RTN, HQQ), QuantizedExperts/QuantizedLinear against the eager
reference, and bad input of the quantize / quantize_mixed methods."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moeinfer.compress.methods.mixed_precision import choose_bits
from moeinfer.formats.quant import dequantize, pack, packed_cols, quantize, unpack
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.formats.quantized_linear import QuantizedLinear
from moeinfer.compress.registry import CompressionError, get_method
from moeinfer.model.moe import Routing, combine, dispatch, expert_compute

BITS = [8, 4, 3, 2]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cols", [1, 8, 20, 37, 192])
def test_pack_unpack_round_trip(bits: int, cols: int) -> None:
    codes = torch.randint(0, 1 << bits, (3, 4, cols), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 4, packed_cols(cols, bits))
    assert torch.equal(unpack(packed, bits, cols), codes)


def test_packed_storage_is_bits_per_code() -> None:
    assert [packed_cols(192, b) for b in BITS] == [192, 96, 72, 48]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("algorithm", ["rtn", "hqq"])
def test_quantize_error_bounded_and_codes_in_range(bits: int, algorithm: str) -> None:
    w = torch.randn(16, 96)
    qt = quantize(w, bits=bits, group_size=32, algorithm=algorithm)
    assert int(unpack(qt.packed, bits, 96).max()) < (1 << bits)
    assert qt.scale.shape == (16, 3)
    err = (qt.dequantize() - w).abs()
    # RTN error is at most half a step wherever the zero point keeps the group in range
    step = qt.scale.repeat_interleave(32, dim=1)
    if algorithm == "rtn":
        assert bool((err <= 0.5 * step + 1e-6).all())
    rel = float(err.pow(2).sum() / w.pow(2).sum())
    assert rel < {8: 1e-4, 4: 0.02, 3: 0.08, 2: 0.35}[bits]


def test_error_falls_with_bits_and_hqq_never_worse_than_rtn() -> None:
    w = torch.randn(32, 128) * torch.rand(32, 1)
    w[0, 5] = 8.0  # an outlier
    errs = {}
    for b in BITS:
        for a in ("rtn", "hqq"):
            errs[b, a] = float((quantize(w, bits=b, group_size=64, algorithm=a).dequantize() - w).pow(2).sum())
        assert errs[b, "hqq"] <= errs[b, "rtn"] + 1e-6
    assert errs[8, "rtn"] < errs[4, "rtn"] < errs[3, "rtn"] < errs[2, "rtn"]


def test_ragged_last_group_and_constant_group() -> None:
    w = torch.randn(4, 40)  # group 16 does not divide 40: groups of 16, 16, 8
    w[1] = 0.25  # a constant row is exact
    qt = quantize(w, bits=4, group_size=16)
    assert qt.scale.shape == (4, 3) and qt.packed.shape == (4, 20)
    deq = dequantize(qt.packed, qt.scale, qt.zero, bits=4, group_size=16, cols=40)
    assert deq.shape == w.shape
    assert torch.equal(deq[1], w[1])
    assert float((deq - w).pow(2).sum() / w.pow(2).sum()) < 0.02


def _routing(N: int, E: int, K: int, *, skip: int | None = None) -> Routing:
    g = torch.Generator().manual_seed(N * 31 + E)
    scores = torch.rand(N, E, generator=g)
    if skip is not None:
        scores[:, skip] = -1  # expert `skip` gets no tokens
    w, idx = scores.softmax(-1).topk(K, dim=-1)
    return Routing(indices=idx, weights=w, logits=scores)


@pytest.mark.parametrize("bits", [[4] * 6, [2, 3, 4, 8, 4, 2], [8] * 6])
@pytest.mark.parametrize("N,K,skip", [(1, 1, None), (1, 2, None), (17, 2, 3), (40, 3, None)])
def test_quantized_experts_equal_expert_compute_on_dequantized_weights(bits, N, K, skip) -> None:
    E, D, I = 6, 40, 24
    gate_up, down = torch.randn(E, 2 * I, D), torch.randn(E, D, I)
    q = QuantizedExperts.from_float(gate_up, down, bits, group_size=16, algorithm="rtn")
    x, routing = torch.randn(N, D), _routing(N, E, K, skip=skip)
    gu, dn = q.dequantize_all()
    d = dispatch(routing.indices, E)
    ref = combine(expert_compute(x[d.tokens], d.counts, gu, dn), d, routing.weights, N)
    assert torch.equal(q.eager_forward(x, routing), ref)  # the reference (widths 4/8 run natively on the CPU:
    # tests/kernels/test_kernels_native.py holds that path to this one)


def test_quantized_experts_only_dequantize_routed_experts(monkeypatch) -> None:
    E, D, I = 5, 16, 8
    q = QuantizedExperts.from_float(torch.randn(E, 2 * I, D), torch.randn(E, D, I), [4] * E, group_size=8)
    seen = []
    orig = q.expert_weights
    monkeypatch.setattr(q, "expert_weights", lambda e, dtype=torch.float32: (seen.append(e), orig(e, dtype))[1])
    q.eager_forward(torch.randn(3, D), Routing(torch.tensor([[1, 3], [3, 1], [1, 3]]), torch.full((3, 2), 0.5), torch.zeros(3, E)))
    assert seen == [1, 3]


@pytest.mark.parametrize("bits,ratio", [(8, 4), (4, 8), (3, 32 / 3), (2, 16)])
def test_quantized_experts_really_shrink(bits: int, ratio: float) -> None:
    E, D, I = 4, 64, 128
    q = QuantizedExperts.from_float(torch.randn(E, 2 * I, D), torch.randn(E, D, I), [bits] * E, group_size=64)
    codes = sum(p.numel() for n, p in q.named_parameters() if n.startswith("q"))
    assert all(p.dtype == torch.uint8 and not p.requires_grad for n, p in q.named_parameters() if n.startswith("q"))
    fp32 = E * 3 * I * D * 4
    assert codes * ratio == pytest.approx(fp32)
    scales = 2 * 4 * E * (2 * I * 1 + D * 2)  # scale + zero, fp32, per group
    assert sum(p.numel() * p.element_size() for p in q.parameters()) == codes + scales
    assert q.weight_bits() == pytest.approx(bits + 2 * 32 / 64)  # fp32 scale + zero per 64 weights


def test_quantized_linear_matches_dequantized_weight() -> None:
    lin = nn.Linear(40, 12, bias=True)
    q = QuantizedLinear.from_linear(lin, bits=4, group_size=16, algorithm="hqq")
    x = torch.randn(5, 40)
    ref = nn.functional.linear(x, q.dequantized(), lin.bias.detach())
    assert torch.equal(q.eager_forward(x), ref)
    torch.testing.assert_close(q(x), ref, atol=1e-5 * float(ref.abs().max()), rtol=0)  # native rows, fp32
    w = lin.weight.detach()
    assert float((q.dequantized() - w).pow(2).sum() / w.pow(2).sum()) < 0.02


def test_choose_bits_meets_budget_and_favours_important_experts() -> None:
    cands = (2, 3, 4)
    loss = torch.tensor([[4.0, 2.0, 1.0]]).repeat(6, 1)
    importance = torch.tensor([10.0, 1, 1, 1, 1, 0.1])
    bits = choose_bits(importance, loss, cands, 2.5)
    assert sum(bits) <= 2.5 * 6 and sum(bits) == 15
    assert bits[0] == 4 and bits[-1] == 2
    assert choose_bits(importance, loss, cands, 2.0) == [2] * 6
    assert choose_bits(importance, loss, cands, 4.0) == [4] * 6


@pytest.mark.parametrize("method,params,match", [
    ("quantize", {"bits": 5}, "unsupported bit width 5"),
    ("quantize", {"bits": 1}, "supported: 2, 3, 4, 8"),
    ("quantize", {"group_size": 0}, "group_size"),
    ("quantize", {"algorithm": "gptq"}, "rtn, hqq"),
    ("quantize", {"scope": "attention"}, "scope"),
    ("quantize", {"lm_head": True}, "lm_head"),
    ("quantize_mixed", {"avg_bits": 1.5}, "impossible"),
    ("quantize_mixed", {"avg_bits": 5.0}, "between 2 and 4"),
    ("quantize_mixed", {"candidates": [2, 5]}, "unsupported bit width 5"),
    ("quantize_mixed", {"candidates": []}, "non-empty"),
    ("quantize_mixed", {"importance": "freq"}, "importance must be one of gate, none"),
    ("quantize_mixed", {"error": "hessian"}, "error must be one of"),
    ("lowrank", {"keep": 0.0}, "keep"),
    ("lowrank", {"keep": 1.5}, "keep"),
])
def test_bad_parameters_are_clear_errors(method: str, params: dict, match: str) -> None:
    with pytest.raises(CompressionError, match=match):
        get_method(method).make_params(params)
