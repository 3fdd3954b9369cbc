"""use_cpu_rope_: the native rotary embedding against moeinfer.model.rope.RotaryEmbedding.rotate (the
eager reference). The native op keeps the reference's roundings (each product, then the sum, in x's
dtype), so fp32 and bf16 outputs are compared with torch.equal."""

from __future__ import annotations

import copy

import pytest
import torch

from moeinfer.config import RopeConfig
from moeinfer.kernels import use_kernel_
from moeinfer.kernels.rope import CpuRotaryEmbedding, restore_rope_, use_cpu_rope_
from moeinfer.model.rope import RotaryEmbedding
from native_helpers import native_ops


def pair(dim: int, rope: RopeConfig = RopeConfig()) -> tuple[RotaryEmbedding, RotaryEmbedding]:
    ref = RotaryEmbedding(rope, dim, 4096)
    fast = RotaryEmbedding(rope, dim, 4096)
    assert use_cpu_rope_(fast) == 1 and isinstance(fast, CpuRotaryEmbedding)
    return fast, ref


def inputs(B: int, H: int, T: int, R: int, dtype: torch.dtype, layout: str, ref: RotaryEmbedding):
    torch.manual_seed(B * 100 + T)
    positions = torch.randint(0, 4000, (B, T))
    cos, sin = ref.cos_sin(positions, dtype)
    if layout == "transposed":  # q as the attention makes it: [B, T, H, R] viewed as [B, H, T, R]
        x = (torch.randn(B, T, H, R) * 4).to(dtype).transpose(1, 2)
    else:
        x = (torch.randn(B, H, T, R) * 4).to(dtype)
    return x, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,T,R", [(1, 16, 1, 128), (2, 4, 5, 64), (3, 2, 7, 6), (1, 1, 300, 16)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_native_rope_equals_the_reference(dtype, B, H, T, R, layout):
    native_ops()
    fast, ref = pair(R, RopeConfig(theta=500000.0))
    x, cos, sin = inputs(B, H, T, R, dtype, layout, ref)
    with torch.no_grad():
        out, want = fast.rotate(x, cos, sin), ref.rotate(x, cos, sin)
    assert out.dtype == want.dtype and out.shape == want.shape
    assert torch.equal(out, want)


def test_yarn_scaled_cos_sin_and_non_finite_values_match():
    native_ops()
    fast, ref = pair(32, RopeConfig(type="yarn", factor=4.0, original_max_position_embeddings=1024))
    x, cos, sin = inputs(2, 3, 4, 32, torch.bfloat16, "transposed", ref)
    x = x.clone()
    x[0, 1, 2, 5] = float("inf")
    x[1, 0, 3, 20] = float("nan")
    with torch.no_grad():
        out, want = fast.rotate(x, cos, sin), ref.rotate(x, cos, sin)
    assert torch.equal(out.isnan(), want.isnan())
    keep = ~want.isnan()
    assert torch.equal(out[keep], want[keep])


def test_interleaved_mismatched_shapes_and_autograd_run_the_reference():
    native_ops()
    fast, ref = pair(16, RopeConfig(interleaved=True))
    x, cos, sin = inputs(1, 2, 3, 16, torch.float32, "contiguous", ref)
    assert torch.equal(fast.rotate(x, cos, sin), ref.rotate(x, cos, sin))
    fast, ref = pair(16)
    x, cos, sin = inputs(2, 2, 3, 16, torch.float32, "contiguous", ref)
    # cos/sin of one batch row broadcast over two: the reference's broadcasting
    assert torch.equal(fast.rotate(x, cos[:1], sin[:1]), ref.rotate(x, cos[:1], sin[:1]))
    xg = x.clone().requires_grad_(True)
    fast.rotate(xg, cos, sin).sum().backward()
    assert xg.grad is not None


def test_native_op_refuses_bad_shapes_by_name():
    ops = native_ops()
    x = torch.randn(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="cos/sin must be"):
        ops.rope(x, torch.randn(1, 3, 6), torch.randn(1, 3, 6))
    with pytest.raises(RuntimeError, match="R even"):
        ops.rope(torch.randn(1, 2, 3, 7), torch.randn(1, 3, 7), torch.randn(1, 3, 7))


def test_model_logits_unchanged_and_restore_undoes_it(tiny_fp32):
    native_ops()
    model = tiny_fp32
    ids = torch.arange(3, 40).reshape(1, -1)
    n = sum(type(m) is RotaryEmbedding for m in model.modules())
    with torch.no_grad():
        want = model(ids)
        assert use_cpu_rope_(model) == n > 0
        got = model(ids)
        bf16 = copy.deepcopy(model).bfloat16()
        restore_rope_(bf16)
        want16 = bf16(ids)
        use_cpu_rope_(bf16)
        got16 = bf16(ids)
    assert torch.equal(got, want) and torch.equal(got16, want16)
    assert restore_rope_(model) == n
    assert not any(isinstance(m, CpuRotaryEmbedding) for m in model.modules())


def test_use_kernel_linears_swaps_the_rotary_embeddings(tiny_fp32):
    native_ops()
    use_kernel_(tiny_fp32, "auto", linears=True)
    assert any(isinstance(m, CpuRotaryEmbedding) for m in tiny_fp32.modules())
