"""`use_cpu_rope_(model)`: the rotary embedding of q and k on one native call each (csrc/dense.cpp
`rope`), in place, like `use_cpu_norms_`: each eligible `RotaryEmbedding` becomes a
`CpuRotaryEmbedding` (a subclass, no parameters; `restore_rope_` turns them back).

At batch 1 the eager rotation (moeinfer.model.rope, the reference; RoFormer, Su et al., 2021) is about
eight torch ops per tensor on a few thousand numbers (chunk, negate, concatenate, two products, a sum,
broadcast views), so its cost is dispatch: sixteen ops per layer and token. The native op computes the
same formula in one pass with the reference's roundings (each product, then the sum, in x's dtype), so
its output equals the reference's bit for bit.
Eligible: the "rotate half" layout (Mixtral, Qwen, OLMoE; DeepSeek's interleaved MLA rotation keeps the
reference), CPU tensors, x, cos and sin all bf16 or all fp32, cos/sin of x's batch, tokens and rotary
width, no autograd; otherwise the reference runs.
"""

from __future__ import annotations

import torch
from torch import nn

from moeinfer.kernels import native
from moeinfer.kernels.swap import swap_in_, swap_out_
from moeinfer.model.rope import RotaryEmbedding

_DTYPES = (torch.bfloat16, torch.float32)


class CpuRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding whose `rotate` is the native `rope` where it applies (module docstring)."""

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if (self.interleaved or x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() != 4
                or cos.dtype != x.dtype or sin.dtype != x.dtype or x.stride(-1) != 1
                or cos.shape != (x.shape[0], x.shape[2], x.shape[3]) or sin.shape != cos.shape
                or (torch.is_grad_enabled() and x.requires_grad)):
            return super().rotate(x, cos, sin)
        return native.load().rope(x, cos, sin)


def use_cpu_rope_(model: nn.Module) -> int:
    """Turn every RotaryEmbedding of `model` into a CpuRotaryEmbedding, in place; returns how many.
    RuntimeError naming the reason when the native library is unavailable."""
    return swap_in_(model, RotaryEmbedding, CpuRotaryEmbedding, "use_cpu_rope_")


def restore_rope_(model: nn.Module) -> int:
    """Undo `use_cpu_rope_`; returns how many modules changed back."""
    return swap_out_(model, CpuRotaryEmbedding, RotaryEmbedding)
