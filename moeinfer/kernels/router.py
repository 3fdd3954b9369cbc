"""`use_cpu_router_(model)`: the router logits of one token on one native call (csrc/ops.cpp `gemv`), in
place, like `use_cpu_norms_`: each eligible `Router` becomes a `CpuRouter` (a subclass: same weight, same
state dict, same routing rules and transforms; `restore_router_` turns them back).

The reference logits, F.linear(x.float(), weight.float()) (moeinfer.model.moe.route), widen the whole
router weight to fp32 on every call and run torch's fp32 GEMM on one row: on a bf16 OLMoE-1B-7B layer
(64 experts x 2048) that is a 512 KB copy and a GEMM set-up, ~0.1 ms a layer at batch 1 on a 2-core
AMD EPYC. The native GEMV reads the weight in place, widened in registers and accumulated in fp32: the
same formula in another summation order, so the logits agree with the reference to fp32 rounding
(tests/kernels/test_kernels_router.py), and expert choice only differs between experts whose logits tie
to that rounding. Scores, top-k and weights are the reference's `select` on those logits.
Eligible: CPU, one token, bf16 or fp32 weight, no autograd; otherwise the reference matmul runs.
"""

from __future__ import annotations

import torch
from torch import nn

from moeinfer.kernels import native
from moeinfer.kernels.swap import swap_in_, swap_out_
from moeinfer.model.moe import Router

_DTYPES = (torch.bfloat16, torch.float32)


class CpuRouter(Router):
    """Router whose one-token logits are the native `gemv` (module docstring); `engine` forces a native
    variant (default: the best this CPU runs)."""

    engine: str | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.shape[0] != 1 or x.device.type != "cpu" or w.dtype not in _DTYPES
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            return super().logits(x)
        # an fp32 row in, so the op returns the fp32 logits [1, E]
        return native.load().gemv(x.float().contiguous(), w, native.resolve_variant(self.engine))


def use_cpu_router_(model: nn.Module, *, engine: str | None = None) -> int:
    """Turn every CPU Router of `model` into a CpuRouter, in place; returns how many.
    RuntimeError naming the reason when the native library is unavailable."""
    return swap_in_(model, Router, CpuRouter, "use_cpu_router_", engine=engine,
                    eligible=lambda m: m.weight.device.type == "cpu")


def restore_router_(model: nn.Module) -> int:
    """Undo `use_cpu_router_`; returns how many modules changed back."""
    return swap_out_(model, CpuRouter, Router)
