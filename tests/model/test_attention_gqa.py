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
