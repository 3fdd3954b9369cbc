"""Preallocated KV cache for a batch of sequences.

Shapes: B batch, S cache slots (max length), Hkv key/value heads, Dh head dim, C latent dim (MLA).
Sequences of different lengths are left-padded: every row writes the same slots at each step and
`valid[b, s]` says whether slot s of row b holds a real token. Attention masks are derived from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeinfer.config import ModelConfig


@dataclass
class LayerKV:
    """One layer's cache: (k, v) [B, Hkv, S, Dh] for GQA, (latent [B, S, C], k_rope [B, S, R]) for MLA."""

    a: torch.Tensor
    b: torch.Tensor


class KVCache:
    """Static-shape cache; `length` slots are filled for every row."""

    def __init__(self, config: ModelConfig, *, batch_size: int, max_length: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length = max_length
        self.batch_size = batch_size
        self.length = 0
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.layers: list[LayerKV] = []
        for _ in range(config.num_layers):
            if config.attention == "mla":
                assert config.mla is not None
                a = torch.zeros(batch_size, max_length, config.mla.kv_lora_rank, device=device, dtype=dtype)
                b = torch.zeros(batch_size, max_length, config.mla.qk_rope_head_dim, device=device, dtype=dtype)
            else:
                shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
                a = torch.zeros(shape, device=device, dtype=dtype)
                b = torch.zeros(shape, device=device, dtype=dtype)
            self.layers.append(LayerKV(a, b))

    def reserve(self, n: int) -> tuple[int, int]:
        """Slot range [start, end) for n new tokens; raises if the cache is full."""
        start, end = self.length, self.length + n
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} tokens > max_length={self.max_length}")
        return start, end

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.a, layer.b))
