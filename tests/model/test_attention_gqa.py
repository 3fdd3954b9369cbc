"""attend(): grouped-query heads read in place on the CPU (SDPA's enable_gqa) give what repeating the
kv heads gives (the eager form, still used off the CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeinfer.model.attention import attend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,S", [(1, 37), (6, 6), (16, 40)])
@pytest.mark.parametrize("H,Hkv", [(8, 2), (4, 4), (6, 1)])
def test_grouped_heads_equal_repeated_heads(dtype, T, S, H, Hkv):
    torch.manual_seed(0)
    q = torch.randn(2, H, T, 32).to(dtype)
    k, v = torch.randn(2, Hkv, S, 32).to(dtype), torch.randn(2, Hkv, S, 32).to(dtype)
    mask = torch.rand(2, 1, T, S) > 0.3
    mask[..., -1] = True
    rep = H // Hkv
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask, scale=0.17).transpose(1, 2).reshape(2, T, -1)
    got = attend(q, k, v, mask, 0.17)
    tol = 1e-6 if dtype == torch.float32 else 2.0**-8
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_a_mask_hiding_nothing_is_dropped_with_the_same_numbers(tiny_fp32, monkeypatch):
    """An unpadded one-token forward on the CPU passes no mask to attention, and each layer's output
    equals what the all-visible boolean mask gives; a causal prefill keeps its mask."""
    import moeinfer.model.attention as attention

    seen = []
    original = attention.attend

    def spy(q, k, v, mask, scale):
        out = original(q, k, v, mask, scale)
        if mask is None:
            visible = torch.ones(q.shape[0], 1, q.shape[2], k.shape[2], dtype=torch.bool)
            assert torch.equal(out, original(q, k, v, visible, scale))
        seen.append(mask)
        return out

    monkeypatch.setattr(attention, "attend", spy)
    ids = torch.arange(3, 12).reshape(1, -1)
    with torch.no_grad():
        tiny_fp32(ids)
        assert len(seen) == tiny_fp32.config.num_layers and all(m is not None for m in seen)
        seen.clear()
        tiny_fp32(ids[:, :1])
        assert len(seen) == tiny_fp32.config.num_layers and all(m is None for m in seen)
