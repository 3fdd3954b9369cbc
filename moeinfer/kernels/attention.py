"""`use_cpu_attention_(model)`: the attention of one new token (batch-1 or batched decode without
padding) on one native call per layer (csrc/dense.cpp `attend_decode`), in place, like
`use_cpu_norms_`: each eligible `Attention` becomes a `CpuAttention` (a subclass: same parameters,
same state dict; `restore_attention_` turns them back).

For one query token over a few hundred cached keys torch's CPU scaled-dot-product attention (flash
attention, Dao et al., 2022) costs ~0.2-0.4 ms per layer, mostly its per-call set-up. The native op
computes softmax(scale * q k^T) v per (row, head) in fp32 (the scores with the variant's row dot
products, max-subtracted exponentials, their sum, the weighted sum of v; grouped-query heads read
their kv head in place), rounded once to the input's dtype, as torch's flash attention does.
Eligible: CPU, one query token, no mask (a mask that hides nothing is already dropped on the CPU),
q/k/v all bf16 or all fp32, no autograd; otherwise the reference `attend` runs.

A decode step whose rows all write the same cache slot (batch-1 decode, an unpadded batch: a KVCache
step with a `uniform_start`) runs everything after the projections in one native call
(`attend_decode_step`): q and k rotated (the "rotate half" RoPE of csrc/dense.cpp `rope`, equal to the
eager rotation bit for bit), k and v stored at the slot, and the attention above over slots
[0, slot]: about twenty torch ops per layer (views, transposes, two rotations, the cache's slice
writes and reads) become one, with the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from moeinfer.kernels import native
from moeinfer.kernels.swap import swap_in_, swap_out_
from moeinfer.model.attention import Attention
from moeinfer.model.kv_cache import CacheStep, LayerKV

_DTYPES = (torch.bfloat16, torch.float32)


class CpuAttention(Attention):
    """Attention whose one-token attention is the native `attend_decode` where it applies (module
    docstring); `engine` forces a native variant (default: the best this CPU runs)."""

    engine: str | None = None

    def rope_cache_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, mask: torch.Tensor | None, kv: LayerKV | None,
                          step: CacheStep | None) -> torch.Tensor:
        if not one_step(q, k, v, cos, sin, mask, kv, step) or self.rotary.interleaved:
            return super().rope_cache_attend(q, k, v, cos, sin, mask, kv, step)
        assert kv is not None and step is not None and step.uniform_start is not None
        return native.load().attend_decode_step(q, k, v, cos, sin, kv.a, kv.b, step.uniform_start, self.scale,
                                                native.resolve_variant(self.engine))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if (mask is not None or q.device.type != "cpu" or q.shape[2] != 1 or q.dtype not in _DTYPES
                or k.dtype != q.dtype or v.dtype != q.dtype or q.shape[-1] != k.shape[-1]
                or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
            return super().attention(q, k, v, mask)
        out = native.load().attend_decode(q, k, v, self.scale, native.resolve_variant(self.engine))
        return out.view(q.shape[0], 1, -1)  # [B, H, 1, Dv] -> [B, 1, H * Dv], as `attend`


def one_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             mask: torch.Tensor | None, kv: LayerKV | None, step: CacheStep | None) -> bool:
    """Whether `attend_decode_step` runs this step: one new token per row (q [B, 1, H, Dh], k/v
    [B, 1, Hkv, Dh] contiguous), all rows at one slot of a KVCache layer (keys and values [B, Hkv, S, Dh]),
    no mask, CPU tensors all bf16 or all fp32, cos/sin over the whole head, no autograd."""
    if (mask is not None or type(kv) is not LayerKV or kv.seq_dim != 2 or step is None
            or step.uniform_start is None or q.shape[1] != 1 or q.device.type != "cpu" or q.dtype not in _DTYPES):
        return False
    dtype, dk = q.dtype, q.shape[-1]
    if not (k.dtype == v.dtype == cos.dtype == sin.dtype == kv.a.dtype == kv.b.dtype == dtype):
        return False
    if k.shape[-1] != dk or kv.a.shape[-1] != dk:
        return False
    if cos.shape != (q.shape[0], 1, dk) or sin.shape != cos.shape or v.shape[-1] != kv.b.shape[-1]:
        return False
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous() and cos.is_contiguous()
            and sin.is_contiguous()):
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def use_cpu_attention_(model: nn.Module, *, engine: str | None = None) -> int:
    """Turn every CPU Attention of `model` into a CpuAttention, in place; returns how many.
    RuntimeError naming the reason when the native library is unavailable."""
    return swap_in_(model, Attention, CpuAttention, "use_cpu_attention_", engine=engine,
                    eligible=lambda m: next(m.parameters()).device.type == "cpu")


def restore_attention_(model: nn.Module) -> int:
    """Undo `use_cpu_attention_`; returns how many modules changed back."""
    return swap_out_(model, CpuAttention, Attention)
