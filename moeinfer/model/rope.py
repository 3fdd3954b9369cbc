"""Rotary position embeddings (RoFormer, Su et al., 2021) with linear and YaRN scaling.

Shapes: B batch, T tokens, H heads, R rotary dims (even).
Two layouts of the rotated pairs exist in checkpoints: "rotate half" (x_i, x_{i+R/2}) used by
Mixtral/Qwen/OLMoE, and "interleaved" (x_{2i}, x_{2i+1}) used by DeepSeek's MLA.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moeinfer.config import RopeConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when the context is not extended)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [R/2], attention scaling of cos/sin) for a rope config.

    YaRN (Peng et al., 2023) steps:
    1. interpolated (1/(factor*base^(2i/R))) and extrapolated (1/base^(2i/R)) frequencies;
    2. a linear ramp over the dims between the correction range given by beta_fast/beta_slow
       rotations at the original context length blends them;
    3. cos/sin are scaled by the attention factor (from mscale / mscale_all_dim or log(factor)).
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.float) / dim
    base_freqs = rope.theta**exponents
    if rope.type == "default":
        return 1.0 / base_freqs, 1.0
    if rope.type == "linear":
        return 1.0 / base_freqs / rope.factor, 1.0
    # yarn
    factor = rope.factor
    original = rope.original_max_position_embeddings or max_position_embeddings
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * base_freqs)) * (1 - extrapolation_weight) + (1.0 / base_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions and rotates q and k.

    Every layer of a model rotates the same positions with the same frequencies: `cos_sin` takes an
    optional per-forward `memo` dict (the model makes a new one for each forward) in which the first
    layer's cos/sin serve the others; a rotary embedding with other frequencies gets its own entry.
    """

    def __init__(self, rope: RopeConfig, dim: int, max_position_embeddings: int) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = inverse_frequencies(rope, dim, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleaved = rope.interleaved
        self._key = (repr(rope), dim, max_position_embeddings)  # what the frequencies are made from

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                memo: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, R] in `dtype` (computed in fp32)."""
        key = (self._key, dtype, positions.device)
        if memo is not None and key in memo:
            return memo[key]
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)  # [B, T, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:  # (scaling by 1.0 changes no bit: skipped)
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        out = cos.to(dtype), sin.to(dtype)
        if memo is not None:
            memo[key] = out
        return out

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, R], cos/sin [B, T, R] -> rotated x."""
        cos, sin = cos[:, None], sin[:, None]
        if self.interleaved:
            half = x.shape[-1] // 2
            cos, sin = cos[..., :half], sin[..., :half]
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
