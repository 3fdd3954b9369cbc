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
"""

from __future__ import annotations

import torch
from torch import nn

from moeinfer.kernels import native
from moeinfer.kernels.swap import swap_in_, swap_out_
from moeinfer.model.attention import Attention

_DTYPES = (torch.bfloat16, torch.float32)


class CpuAttention(Attention):
    """Attention whose one-token attention is the native `attend_decode` where it applies (module
    docstring); `engine` forces a native variant (default: the best this CPU runs)."""

    engine: str | None = None

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if (mask is not None or q.device.type != "cpu" or q.shape[2] != 1 or q.dtype not in _DTYPES
                or k.dtype != q.dtype or v.dtype != q.dtype or q.shape[-1] != k.shape[-1]
                or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
            return super().attention(q, k, v, mask)
        out = native.load().attend_decode(q, k, v, self.scale, native.resolve_variant(self.engine))
        return out.view(q.shape[0], 1, -1)  # [B, H, 1, Dv] -> [B, 1, H * Dv], as `attend`


def use_cpu_attention_(model: nn.Module, *, engine: str | None = None) -> int:
    """Turn every CPU Attention of `model` into a CpuAttention, in place; returns how many.
    RuntimeError naming the reason when the native library is unavailable."""
    return swap_in_(model, Attention, CpuAttention, "use_cpu_attention_", engine=engine,
                    eligible=lambda m: next(m.parameters()).device.type == "cpu")


def restore_attention_(model: nn.Module) -> int:
    """Undo `use_cpu_attention_`; returns how many modules changed back."""
    return swap_out_(model, CpuAttention, Attention)
