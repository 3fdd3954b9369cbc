"""Shared by the static-decode and GPU-path tests: a left-padded batch prefilled into a fresh KV cache."""

from __future__ import annotations

import torch

from moeinfer.model.kv_cache import KVCache


def left_padded_prefill(model, prompts: list[list[int]], steps: int) -> tuple[KVCache, torch.Tensor]:
    """Prompts left-padded into one batch, prefilled into a cache with room for `steps` more tokens;
    returns the cache and the last position's logits [B, V]."""
    device = model.device
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = True
    cache = KVCache(model.config, batch_size=B, max_length=T + steps, device=device, dtype=model.dtype)
    return cache, model(ids, attention_mask=mask, cache=cache)[:, -1]
