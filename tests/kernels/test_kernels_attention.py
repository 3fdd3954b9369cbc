"""use_cpu_attention_: the native one-token attention (csrc/dense.cpp `attend_decode`) against
moeinfer.model.attention.attend (the reference: torch's SDPA) on the same q, k, v. Both compute in fp32
and round once: fp32 outputs agree to 1e-5 relative, bf16 outputs to one bf16 rounding (a 1% error
fails both checks); each native variant forced by name."""

from __future__ import annotations

import copy

import pytest
import torch

from moeinfer.kernels import use_kernel_
from moeinfer.kernels.attention import CpuAttention, restore_attention_, use_cpu_attention_
from moeinfer.model.attention import Attention, attend
from native_helpers import native_ops, require, variant_params


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2.0**-7, atol=2.0**-8 * float(ref.abs().max()))


def qkv(B, H, Hkv, S, D, dtype, *, cache: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, 1, H, D, generator=g) * 2).to(dtype).transpose(1, 2)  # as the layer makes it
    if cache:  # a preallocated cache [B, Hkv, max, D] read up to S, as KVCache.write returns it
        k = (torch.randn(B, Hkv, S + 5, D, generator=g)).to(dtype)[:, :, :S]
        v = (torch.randn(B, Hkv, S + 5, D, generator=g)).to(dtype)[:, :, :S]
    else:
        k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,S,D", [(1, 16, 16, 1, 128), (1, 16, 4, 37, 64), (3, 4, 2, 300, 32),
                                         (2, 6, 1, 9, 20)])
@pytest.mark.parametrize("cache", [False, True])
def test_native_attention_matches_the_reference(variant, dtype, B, H, Hkv, S, D, cache):
    require(variant)
    ops = native_ops()
    q, k, v = qkv(B, H, Hkv, S, D, dtype, cache=cache)
    scale = D**-0.5
    out = ops.attend_decode(q, k, v, scale, variant).view(B, 1, -1)
    check(out, attend(q, k, v, None, scale))


def test_a_one_percent_error_fails_the_check():
    ref = torch.linspace(-1, 1, 64)
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(AssertionError):
            check((ref * 1.01).to(dtype), ref.to(dtype))


def test_native_op_refuses_bad_shapes_by_name():
    ops = native_ops()
    q, k, v = qkv(1, 4, 2, 5, 8, torch.float32, cache=False)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        ops.attend_decode(q, k, v[:, :, :4], 1.0, "generic")
    with pytest.raises(RuntimeError, match=r"q \[B, H, 1, D\]"):
        ops.attend_decode(torch.randn(1, 4, 2, 8), k, v, 1.0, "generic")


def decode_logits(model, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Logits of a prefill then `steps` one-token decode steps over a KV cache (greedy tokens fed back)."""
    from moeinfer.model.kv_cache import KVCache

    cache = KVCache(model.config, batch_size=1, max_length=len(prompt) + steps + 1, device="cpu", dtype=model.dtype)
    out = [model(torch.tensor([prompt]), cache=cache)[:, -1]]
    for _ in range(steps):
        out.append(model(out[-1].argmax(-1)[:, None], cache=cache)[:, -1])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_with_native_attention_match(tiny_fp32, dtype):
    """The model's decode steps (one token over its KV cache, heads as configured) with the native
    attention give the reference's logits within the dtype's tolerance; prefill keeps the reference."""
    native_ops()
    model = tiny_fp32.to(dtype)
    fast = copy.deepcopy(model)
    n = use_cpu_attention_(fast)
    assert n == sum(type(m) is Attention for m in model.modules()) > 0
    with torch.no_grad():
        want = decode_logits(model, list(range(5, 25)), 6)
        got = decode_logits(fast, list(range(5, 25)), 6)
    assert torch.equal(got[0], want[0])  # prefill: the reference in both
    for a, b in zip(got[1:], want[1:]):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02 * float(b.abs().max()))
    assert restore_attention_(fast) == n and not any(isinstance(m, CpuAttention) for m in fast.modules())


def test_use_kernel_linears_swaps_attention(tiny_fp32):
    native_ops()
    use_kernel_(tiny_fp32, "auto", linears=True)
    assert any(isinstance(m, CpuAttention) for m in tiny_fp32.modules())


def test_use_kernel_linears_on_a_model_with_quantized_attention(tiny_fp32):
    """The -all presets replace the attention projections by QuantizedLinear (no `weight`): the swap
    still applies (alone and through use_kernel_) and decode matches the model without it."""
    native_ops()
    from moeinfer.compress import compress_

    compress_(tiny_fp32, "q8_0-all")
    fast = copy.deepcopy(tiny_fp32)
    assert use_cpu_attention_(fast) > 0
    with torch.no_grad():
        want = decode_logits(tiny_fp32, list(range(5, 20)), 3)
        got = decode_logits(fast, list(range(5, 20)), 3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    restore_attention_(fast)
    use_kernel_(fast, "auto", linears=True)
    assert any(isinstance(m, CpuAttention) for m in fast.modules())


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,D,slot", [(1, 6, 2, 32, 0), (1, 16, 16, 64, 37), (3, 4, 2, 20, 9)])
def test_decode_step_in_one_call_equals_the_steps(variant, dtype, B, H, Hkv, D, slot):
    """attend_decode_step (rotate q and k, store k and v at the slot, attend) against the same steps one
    op at a time: the native rope, the cache's slice writes, attend_decode over slots [0, slot]. Same
    arithmetic, so the output and the whole cache are bit-equal. The cache is a row view of a larger
    one (strided rows), as KVCache.rows gives."""
    require(variant)
    ops = native_ops()
    g = torch.Generator().manual_seed(slot)
    q = (torch.randn(B, 1, H, D, generator=g) * 2).to(dtype)
    k = (torch.randn(B, 1, Hkv, D, generator=g) * 2).to(dtype)
    v = torch.randn(B, 1, Hkv, D, generator=g).to(dtype)
    angle = torch.rand(B, 1, D, generator=g) * 6
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    full = torch.randn(2, B + 1, Hkv, slot + 4, D, generator=g).to(dtype)
    k_cache, v_cache = full[0, 1:].clone(), full[1, 1:].clone()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    out = ops.attend_decode_step(q, k, v, cos, sin, k_cache, v_cache, slot, D**-0.5, variant)
    q_rot = ops.rope(q.transpose(1, 2), cos, sin)
    k_ref[:, :, slot:slot + 1] = ops.rope(k.transpose(1, 2), cos, sin)
    v_ref[:, :, slot:slot + 1] = v.transpose(1, 2)
    want = ops.attend_decode(q_rot, k_ref[:, :, :slot + 1], v_ref[:, :, :slot + 1], D**-0.5, variant).view(B, 1, -1)
    assert out.shape == (B, 1, H * D) and out.dtype == dtype
    assert torch.equal(out, want)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_decode_step_refuses_bad_input_by_name():
    ops = native_ops()
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    cos = sin = torch.randn(1, 1, 8)
    cache = torch.zeros(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="slot 5 outside the cache's 5 slots"):
        ops.attend_decode_step(q, k, v, cos, sin, cache, cache.clone(), 5, 1.0, "generic")
    with pytest.raises(RuntimeError, match="all bfloat16 or all float32"):
        ops.attend_decode_step(q.bfloat16(), k, v, cos, sin, cache, cache.clone(), 0, 1.0, "generic")
    with pytest.raises(RuntimeError, match="k/v must hold one new token per row"):
        ops.attend_decode_step(q, torch.randn(1, 2, 2, 8), v, cos, sin, cache, cache.clone(), 0, 1.0, "generic")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_decode_in_one_call_per_layer_equals_the_steps(tiny_fp32, dtype, monkeypatch):
    """Whole-model decode under use_kernel_(linears=True), several steps: each layer's step in one
    native call gives the logits of the same kernels one op at a time (torch.equal), and it ran."""
    native_ops()
    from moeinfer.kernels import attention

    model = tiny_fp32.to(dtype)
    use_kernel_(model, "cpu", linears=True)
    runs = []
    real = attention.one_step
    monkeypatch.setattr(attention, "one_step", lambda *a: runs.append(real(*a)) or runs[-1])
    with torch.no_grad():
        fused = decode_logits(model, list(range(5, 25)), 6)
    assert runs.count(True) == 6 * model.config.num_layers  # every decode step, never the prefill
    monkeypatch.setattr(attention, "one_step", lambda *a: False)
    with torch.no_grad():
        steps = decode_logits(model, list(range(5, 25)), 6)
    for a, b in zip(fused, steps):
        assert torch.equal(a, b)
