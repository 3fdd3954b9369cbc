"""The fused Triton MoE over quantized experts against QuantizedExperts' eager dequantizing forward.
Without a GPU it runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before the kernels
are defined), on small shapes: D, I not multiples of 16, group sizes leaving a shorter last group."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kernel_cases import tolerance  # noqa: E402
from moeinfer.formats.quantized_experts import QuantizedExperts  # noqa: E402
from moeinfer.kernels.configs import KernelConfig  # noqa: E402
from moeinfer.kernels.fused_moe_quant import fit_to_groups, fused_moe_quantized, quantized_unsupported  # noqa: E402
from moeinfer.model.moe import Routing  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_layer(*, E: int, D: int, I: int, bits: list[int], group_size: int, algorithm: str = "rtn",
               seed: int = 0) -> QuantizedExperts:
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * I, D, generator=g) / D**0.5
    down = torch.randn(E, D, I, generator=g) / I**0.5
    return QuantizedExperts.from_float(gate_up, down, bits, group_size=group_size, algorithm=algorithm).to(DEVICE)


def make_routing(*, N: int, E: int, K: int, hot: int | None = None, seed: int = 0) -> Routing:
    """K distinct experts per token among the first `hot` (the others receive nothing)."""
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.stack([torch.randperm(hot or E, generator=g)[:K] for _ in range(N)])
    w = torch.rand(N, K, generator=g)
    return Routing(indices=idx.to(DEVICE), weights=w.to(DEVICE), logits=torch.zeros(N, E, device=DEVICE))


def check(layer: QuantizedExperts, N: int, K: int, *, hot: int | None = None, dtype: torch.dtype = torch.float32,
          config: KernelConfig | None = None) -> None:
    routing = make_routing(N=N, E=layer.num_experts, K=K, hot=hot)
    x = torch.randn(N, layer.hidden_size, generator=torch.Generator().manual_seed(N)).to(DEVICE, dtype)
    out = fused_moe_quantized(x, routing.indices, routing.weights, layer, config=config)
    ref = layer.eager_forward(x, routing)
    assert out.shape == ref.shape and out.dtype == ref.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tolerance(ref, dtype), rtol=0)


CASES = [  # bits, E, D, I, group_size, N, K, hot
    (8, 6, 36, 20, 16, 7, 2, 4),  # groups 16, 16, 4 of D; 16, 4 of I; experts 4, 5 idle
    (8, 4, 40, 27, 32, 1, 1, None),  # one token, top-1, group longer than I
    (4, 6, 36, 20, 16, 7, 2, 4),
    (4, 4, 40, 27, 32, 1, 1, None),
    (4, 5, 50, 22, 12, 7, 1, 3),  # odd I: the last byte of a 4-bit row holds one code
    (2, 6, 36, 20, 16, 7, 2, None),
    (4, 8, 36, 20, 16, 1, 2, None),  # one token, top-2
    (8, 8, 36, 20, 16, 1, 2, None),
]


@pytest.mark.parametrize("bits,E,D,I,group_size,N,K,hot", CASES)
def test_fused_quant_matches_eager(bits, E, D, I, group_size, N, K, hot):
    check(make_layer(E=E, D=D, I=I, bits=[bits] * E, group_size=group_size), N, K, hot=hot)


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_quant_small_blocks(bits):
    """Several K-tiles per row, tiles that cut groups (16 vs group 12) and several blocks per expert."""
    cfg = KernelConfig(block_m=16, block_n_gate_up=16, block_k_gate_up=16, block_n_down=16, block_k_down=16)
    check(make_layer(E=3, D=44, I=26, bits=[bits] * 3, group_size=12), 20, 2, config=cfg)


def test_fused_quant_hqq_zero_points_and_bf16():
    """HQQ's fractional zero-points, and bf16 activations (weights rounded to bf16 as the eager path does)."""
    layer = make_layer(E=4, D=36, I=20, bits=[4] * 4, group_size=16, algorithm="hqq")
    check(layer, 7, 2)
    check(layer, 7, 2, dtype=torch.bfloat16)


def test_fused_quant_no_tokens():
    layer = make_layer(E=4, D=36, I=20, bits=[8] * 4, group_size=16)
    x = torch.zeros(0, 36, device=DEVICE)
    out = fused_moe_quantized(x, torch.zeros(0, 2, dtype=torch.long, device=DEVICE),
                              torch.zeros(0, 2, device=DEVICE), layer)
    assert out.shape == (0, 36)


def test_fused_quant_refuses_mixed_and_3bit():
    mixed = make_layer(E=3, D=36, I=20, bits=[4, 8, 4], group_size=16)
    three = make_layer(E=3, D=36, I=20, bits=[3] * 3, group_size=16)
    assert "mixed" in quantized_unsupported(mixed) and "3-bit" in quantized_unsupported(three)
    assert quantized_unsupported(make_layer(E=2, D=36, I=20, bits=[4, 4], group_size=16)) is None
    routing = make_routing(N=2, E=3, K=1)
    with pytest.raises(ValueError, match="mixed bit widths"):
        fused_moe_quantized(torch.randn(2, 36, device=DEVICE), routing.indices, routing.weights, mixed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_experts_forward_uses_fused_on_cuda(bits, dtype, monkeypatch):
    """On CUDA the module's forward takes the fused kernel (eager never runs) and matches eager."""
    layer = make_layer(E=8, D=136, I=72, bits=[bits] * 8, group_size=32)
    routing = make_routing(N=33, E=8, K=2, hot=6)
    x = torch.randn(33, 136, device=DEVICE, dtype=dtype)
    ref = layer.eager_forward(x, routing)
    monkeypatch.setattr(QuantizedExperts, "eager_forward", lambda *a: pytest.fail("eager path ran on CUDA"))
    out = layer(x, routing)
    torch.testing.assert_close(out.float(), ref.float(), atol=tolerance(ref, dtype), rtol=0)


@pytest.mark.parametrize("group_size,expected_bk", [(128, 128), (64, 64), (32, 32), (96, 32), (12, 16), (24, 16)])
def test_k_tiles_fit_inside_quantization_groups(group_size, expected_bk):
    """K-tiles that divide the group read one scale per row (the fast path); groups with no power-of-two
    divisor >= 16 get K-tiles of 16 (the per-element path, small enough for shared memory)."""
    cfg = fit_to_groups(KernelConfig(block_k_gate_up=128, block_k_down=128), group_size)
    assert cfg.block_k_gate_up == cfg.block_k_down == expected_bk


@pytest.mark.parametrize("group_size", [32, 12])
def test_fused_quant_row_scales_and_element_scales_agree_with_eager(group_size):
    """Both dequantization paths of the kernel over several groups per row: tiles inside one group
    (group 32, scales per row) and tiles cutting groups (group 12, scales per element)."""
    check(make_layer(E=4, D=136, I=72, bits=[4] * 4, group_size=group_size), 5, 2)


def test_fused_quant_expert_map_drops_absent_experts():
    """The packed variant takes an expert map as the float one does (expert parallelism): global ids
    mapped to local rows, slots of absent experts (-1) add nothing."""
    local = make_layer(E=4, D=36, I=20, bits=[4] * 4, group_size=16)
    expert_map = torch.tensor([2, -1, 0, -1, 3, 1, -1, -1], device=DEVICE)  # 8 global experts, 4 here
    routing = make_routing(N=9, E=8, K=2)
    x = torch.randn(9, 36, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out = fused_moe_quantized(x, routing.indices, routing.weights, local, expert_map=expert_map)
    mapped = expert_map[routing.indices]
    ref = local.eager_forward(x, Routing(indices=mapped.clamp(min=0), weights=routing.weights * (mapped >= 0),
                                         logits=torch.zeros(9, 4, device=DEVICE)))
    assert (mapped < 0).any() and (mapped >= 0).any()
    torch.testing.assert_close(out, ref, atol=tolerance(ref, torch.float32), rtol=0)


@pytest.mark.parametrize("shared_kind", ["float", "packed"])
def test_fused_quant_shared_expert_with_gate(shared_kind):
    """A shared expert (float or packed) added to every token, scaled by its sigmoid gate."""
    from moeinfer.kernels.fused_moe import ExpertWeights
    from moeinfer.kernels.fused_moe_quant import packed_weights

    routed = make_layer(E=6, D=36, I=20, bits=[8] * 6, group_size=16)
    one = make_layer(E=1, D=36, I=24, bits=[4], group_size=16, seed=5)
    routing = make_routing(N=7, E=6, K=2)
    x = torch.randn(7, 36, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    gate = torch.rand(7, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    shared_routing = Routing(indices=torch.zeros(7, 1, dtype=torch.long, device=DEVICE), weights=gate[:, None],
                             logits=torch.zeros(7, 1, device=DEVICE))
    if shared_kind == "packed":
        shared = packed_weights(*[getattr(one, f"{k}4_{m}") for m in ("gate_up", "down") for k in ("q", "s", "z")],
                                bits=4, group_size=16, hidden_size=36, intermediate_size=24)
        shared_ref = one.eager_forward(x, shared_routing)
    else:
        gate_up, down = one.expert_weights(0, torch.float32)
        shared = ExpertWeights(gate_up[None].contiguous(), down[None].contiguous(), 24)
        shared_ref = one.eager_forward(x, shared_routing)  # the same dequantized weights, float this time
    out = fused_moe_quantized(x, routing.indices, routing.weights, routed, shared=shared, shared_weight=gate)
    ref = routed.eager_forward(x, routing) + shared_ref
    torch.testing.assert_close(out, ref, atol=tolerance(ref, torch.float32), rtol=0)


def quantized_model():
    from offload_helpers import random_mixtral

    model = random_mixtral(layers=2, hidden=40, inter=20, vocab=64)
    for layer in model.layers:
        ex = layer.mlp.experts
        layer.mlp.experts = QuantizedExperts.from_float(ex.gate_up_proj.detach(), ex.down_proj.detach(), [4] * 8,
                                                        group_size=16, algorithm="rtn")
    return model


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's refusal of the triton kernel")
def test_triton_kernel_for_quantized_experts_off_cuda_is_refused_or_honoured(monkeypatch):
    """`--kernel triton` on quantized experts on the CPU is an error naming why (Triton runs on CUDA)
    unless Triton's interpreter is on; then the fused kernel is what runs, and 'reference' runs eager."""
    import moeinfer.formats.quantized_experts as qe
    from moeinfer.kernels import use_kernel_
    from moeinfer.kernels.registry import KernelUnavailableError

    model = quantized_model()
    ids = torch.tensor([[3, 9, 27, 1, 5]])
    with torch.no_grad():
        ref = model(ids)  # auto on the CPU: native kernels or eager
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError, match="'triton' is unavailable on cpu.*CUDA"):
        use_kernel_(model, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    use_kernel_(model, "triton")
    monkeypatch.setattr(qe, "quantized_moe_cpu", lambda *a, **k: pytest.fail("the CPU kernel ran under 'triton'"))
    monkeypatch.setattr(QuantizedExperts, "eager_forward", lambda *a: pytest.fail("eager ran under 'triton'"))
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(out, ref, atol=tolerance(ref, torch.float32), rtol=0)
    monkeypatch.undo()
    use_kernel_(model, "reference")
    import moeinfer.kernels.fused_moe_quant as fq
    monkeypatch.setattr(fq, "fused_moe_quantized", lambda *a, **k: pytest.fail("fused ran under 'reference'"))
    monkeypatch.setattr(qe, "quantized_moe_cpu", lambda *a, **k: pytest.fail("the CPU kernel ran under 'reference'"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, atol=tolerance(ref, torch.float32), rtol=0)
