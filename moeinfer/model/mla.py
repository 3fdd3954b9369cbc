"""Multi-head latent attention (MLA; DeepSeek-AI, 2024, "DeepSeek-V2", section 2.1), eager reference.

Shapes: B batch, T new tokens, S key slots, D hidden, H heads, Cq q_lora_rank, C kv_lora_rank,
Dn qk_nope_head_dim, R qk_rope_head_dim, Dq = Dn + R, Dv v_head_dim.

Keys and values are compressed jointly into one latent c_kv [C] per token, and only that latent and
one shared rotated key part k_rope [R] are cached: (C + R) numbers per token and layer instead of
2*H*Dh. Steps, mirrored by the comments of `MLAttention.forward`:
1. queries: q = W_UQ(norm(W_DQ x)) (low-rank, V3 and V2) or q = W_Q x (V2-Lite), split per head
   into q_nope [Dn] and q_rope [R];
2. joint KV compression: [c_kv, k_rope] = W_DKV x, then c_kv = norm(c_kv);
3. decoupled RoPE on q_rope (per head) and on the single k_rope shared by all heads;
4. cache c_kv and the rotated k_rope at the new slots, read every slot up to the last new one;
5. up-project the latent into per-head keys and values: [k_nope, v] = W_UKV c_kv,
   k = [k_nope, k_rope];
6. scaled dot-product attention, scale Dq^-0.5 (times mscale^2 under a scaled rope, as DeepSeek's
   YaRN does), then the output projection.
This reference expands the latent at every step; absorbing W_UK into the query and W_UV into the
output (the paper's inference form) is a fast path that must match it.
"""

from __future__ import annotations

import torch
from torch import nn

from moeinfer.config import ModelConfig, RopeConfig
from moeinfer.model.attention import attend
from moeinfer.model.kv_cache import CacheStep, LayerKV
from moeinfer.model.norm import RMSNorm
from moeinfer.model.rope import RotaryEmbedding, yarn_mscale


def softmax_scale(rope: RopeConfig, qk_head_dim: int) -> float:
    """Dq^-0.5, times mscale(factor, mscale_all_dim)^2 for any scaled rope that sets mscale_all_dim.

    DeepSeek's YaRN scales cos/sin by mscale/mscale_all_dim (see rope.py) and the logits by
    mscale_all_dim^2, so that with mscale == mscale_all_dim the rotary part is unscaled while the
    whole logit is. transformers applies it to every non-default rope type; so do we.
    """
    scale = qk_head_dim**-0.5
    if rope.type != "default" and rope.mscale_all_dim:
        mscale = yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * mscale * mscale
    return scale


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 attention; parameter names are those of the HF checkpoints under `self_attn.`."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        if config.mla is None:
            raise ValueError("MLAttention needs config.mla (an MLAConfig)")
        mla = config.mla
        D, H = config.hidden_size, config.num_heads
        self.layer_idx = layer_idx
        self.num_heads = H
        self.kv_lora_rank = mla.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.qk_head_dim = self.nope_dim + self.rope_dim
        self.q_lora_rank = mla.q_lora_rank
        # The a-projections take attention_bias (config.qkv_bias); q_proj, q_b_proj, kv_b_proj never
        # have a bias in the checkpoints.
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, mla.q_lora_rank, bias=config.qkv_bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, mla.kv_lora_rank + self.rope_dim, bias=config.qkv_bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=config.o_bias)
        self.rotary = RotaryEmbedding(config.rope, self.rope_dim, config.max_position_embeddings)
        self.scale = softmax_scale(config.rope, self.qk_head_dim)

    def forward(self, x: torch.Tensor, *, positions: torch.Tensor, mask: torch.Tensor | None,
                kv: LayerKV | None = None, step: CacheStep | None = None,
                rope_memo: dict | None = None) -> torch.Tensor:
        """x [B, T, D], positions [B, T], mask [B, 1, T, S] bool -> [B, T, D]."""
        B, T, _ = x.shape
        H = self.num_heads
        # 1. Queries, optionally through the low-rank bottleneck.
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # [B, T, H*Dq]
        q = q.view(B, T, H, self.qk_head_dim).transpose(1, 2)  # [B, H, T, Dq]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)

        # 2. Joint KV compression; the normalised latent is what gets cached.
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, C]

        # 3. Decoupled RoPE: per-head query part, one key part shared by all heads.
        cos, sin = self.rotary.cos_sin(positions, x.dtype, rope_memo)  # [B, T, R]
        q_rope = self.rotary.rotate(q_rope, cos, sin)  # [B, H, T, R]
        k_rope = self.rotary.rotate(k_rope[:, None], cos, sin)[:, 0]  # [B, T, R]

        # 4. Cache the compressed latent and the rotated shared key; attend over every slot so far.
        if kv is not None:
            if step is None:
                raise ValueError("MLAttention: a KV cache needs the CacheStep of the new tokens")
            latent, k_rope = kv.write(step, latent, k_rope)  # [B, S, C], [B, S, R]
        S = latent.shape[1]

        # 5. Up-project the latent into per-head keys and values.
        k_nope, v = (self.kv_b_proj(latent).view(B, S, H, self.nope_dim + self.v_dim).transpose(1, 2)
                     .split([self.nope_dim, self.v_dim], dim=-1))  # [B, H, S, Dn], [B, H, S, Dv]
        k = torch.cat((k_nope, k_rope[:, None].expand(B, H, S, self.rope_dim)), dim=-1)  # [B, H, S, Dq]
        q = torch.cat((q_nope, q_rope), dim=-1)  # [B, H, T, Dq]

        # 6. Attention and output projection.
        return self.o_proj(attend(q, k, v, mask, self.scale))
