"""Grouped-query attention (Ainslie et al., 2023) with RoPE, optional q/k RMSNorm and a KV cache.

Shapes: B batch, T new tokens, S key slots, H query heads, Hkv kv heads, Dh head dim, D hidden.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moeinfer.config import ModelConfig
from moeinfer.model.kv_cache import CacheStep, LayerKV
from moeinfer.model.norm import RMSNorm
from moeinfer.model.rope import RotaryEmbedding


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """q [B,H,T,Dq], k [B,Hkv,S,Dq], v [B,Hkv,S,Dv] (H a multiple of Hkv), mask [B,1,T,S] bool or None
    (every key visible) -> [B,T,H*Dv].

    Grouped-query heads: on the CPU, SDPA reads each kv head for its group of query heads
    (`enable_gqa`, the same numbers as repeating them); elsewhere the kv heads are repeated, the
    form every CUDA attention backend accepts.
    """
    H, Hkv = q.shape[1], k.shape[1]
    if H == Hkv:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    elif q.device.type == "cpu":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        rep = H // Hkv
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1),
                                             attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class Attention(nn.Module):
    """Causal self-attention; q/k norm per head (Qwen3-MoE) or over the full projection (OLMoE)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        D, H, Hkv, Dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, Dh
        self.q_proj = nn.Linear(D, H * Dh, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=config.o_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm == "head":
            self.q_norm = RMSNorm(Dh, config.rms_norm_eps)
            self.k_norm = RMSNorm(Dh, config.rms_norm_eps)
        elif config.qk_norm == "full":
            self.q_norm = RMSNorm(H * Dh, config.rms_norm_eps)
            self.k_norm = RMSNorm(Hkv * Dh, config.rms_norm_eps)
        self.clip_qkv = config.clip_qkv
        self.rotary = RotaryEmbedding(config.rope, Dh, config.max_position_embeddings)
        self.scale = Dh**-0.5

    def forward(self, x: torch.Tensor, *, positions: torch.Tensor, mask: torch.Tensor | None,
                kv: LayerKV | None = None, step: CacheStep | None = None,
                rope_memo: dict | None = None) -> torch.Tensor:
        q, k, v = self.project(x)  # [B, T, H, Dh], [B, T, Hkv, Dh] x 2
        cos, sin = self.rotary.cos_sin(positions, x.dtype, rope_memo)
        return self.o_proj(self.rope_cache_attend(q, k, v, cos, sin, mask, kv, step))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q [B, T, H, Dh], k and v [B, T, Hkv, Dh]: projections, q/k norms, clipping."""
        norms = (self.q_norm, self.k_norm) if self.qk_norm in ("full", "head") else (None, None)
        return self.project_with(x, (self.q_proj, self.k_proj, self.v_proj), norms)

    def project_with(self, x: torch.Tensor, projections: tuple[Callable, Callable, Callable],
                     norms: tuple[Callable | None, Callable | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`project` with these callables as the q/k/v projections and the q/k norms (project passes the
        modules; moeinfer.engine.cpu_decode prepared calls of them)."""
        B, T, _ = x.shape
        q, k, v = (f(x) for f in projections)  # [B, T, H*Dh] ...
        if self.qk_norm == "full":
            q, k = norms[0](q), norms[1](k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = norms[0](q), norms[1](k)
        return q, k, v

    def rope_cache_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, mask: torch.Tensor | None, kv: LayerKV | None,
                          step: CacheStep | None) -> torch.Tensor:
        """The steps after the projections: q [B, T, H, Dh], k/v [B, T, Hkv, Dh], cos/sin [B, T, Dh] ->
        rotate q and k, store k and v in the cache (when given), attend -> [B, T, H*Dh] (a kernel may
        override it: moeinfer.kernels)."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H*, T, Dh]
        q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
        if kv is not None:
            assert step is not None, "a KV cache needs the CacheStep of the new tokens"
            k, v = kv.write(step, k, v)  # [B, Hkv, S, Dh]
        return self.attention(q, k, v, mask)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The attention of `attend` with this layer's scale (a kernel may override it: moeinfer.kernels)."""
        return attend(q, k, v, mask, self.scale)
