"""`use_cpu_norms_(model)`: the model's RMSNorms on one native call each (csrc/dense.cpp `rms_norm`),
in place, like `use_cpu_linears_`: each eligible `RMSNorm` becomes a `CpuRMSNorm` (a subclass: same
weight, same state dict; `restore_norms_` turns them back).

At batch 1 the eager RMSNorm (moeinfer.model.norm, the reference) is eight torch ops on one row of
a few thousand numbers, so its cost is dispatch, not arithmetic: a decode step of a 16-layer OLMoE
model runs 33 of them. The native op computes the same formula in one pass (the mean of squares in
double, then the fp32 normalisation cast to the input's dtype and scaled in it, as the reference).
Eligible: CPU tensors, x and weight both bf16 or both fp32, no autograd; otherwise the reference runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moeinfer.kernels import native
from moeinfer.kernels.swap import swap_in_, swap_out_
from moeinfer.model.norm import RMSNorm

_DTYPES = (torch.bfloat16, torch.float32)


class CpuRMSNorm(RMSNorm):
    """RMSNorm whose forward is the native `rms_norm` where it applies (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type != "cpu" or x.dtype != w.dtype or x.dtype not in _DTYPES
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            return super().forward(x)
        return native.load().rms_norm(x, w, self.eps)


    def row_op(self, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The native call for inputs of `dtype` with the weight resolved once (a prepared step of
        moeinfer.engine.cpu_decode): the same call, so the same bits. None where it does not apply."""
        w, eps = self.weight, self.eps
        if w.device.type != "cpu" or w.dtype != dtype or dtype not in _DTYPES or w.requires_grad:
            return None
        op = native.load().rms_norm
        return lambda x: op(x, w, eps)


def use_cpu_norms_(model: nn.Module) -> int:
    """Turn every CPU RMSNorm of `model` into a CpuRMSNorm, in place; returns how many.
    RuntimeError naming the reason when the native library is unavailable."""
    return swap_in_(model, RMSNorm, CpuRMSNorm, "use_cpu_norms_", eligible=lambda m: m.weight.device.type == "cpu")


def restore_norms_(model: nn.Module) -> int:
    """Undo `use_cpu_norms_`; returns how many modules changed back."""
    return swap_out_(model, CpuRMSNorm, RMSNorm)
