"""`use_cpu_linears_(model)`: the dense linears of a loaded model (attention projections, shared
expert, lm_head, ...) on the native CPU kernels, in place (applied after loading, like
`use_kernel_`; the model code is untouched).

Each eligible `nn.Linear` becomes a `CpuLinear` (a subclass: same parameters, same state dict, saved
and loaded as before; `restore_linears_` turns them back). Its forward:
1. one token (decode): a native GEMV reading the bf16 weight once, widened in registers,
   accumulated in fp32 (csrc/ops.cpp `gemv`), on torch's thread pool;
2. a few tokens (fewer than WIDEN_ROWS), on CPUs without native bf16 matmul: one native call reading
   each bf16 weight row once for all the rows, widened in registers (csrc/moe_rows.cpp `linear_rows`),
   since a bf16 GEMM is ~10x slower there and widening the weight to fp32 for an fp32 GEMM moves ~5x
   its bytes;
3. many tokens (long prompts), same CPUs: the weight widened to fp32 in slices of output rows (at
   most WIDEN_SLICE_BYTES at a time) and torch's fp32 GEMM: there the widening is a small part of the
   product, and torch's blocked GEMM ran a 512x2048 by 2048x2048 product ~1.8x faster than the row
   product (2026-11-28, AMD EPYC Zen 3, one thread; equal at 128 rows);
4. otherwise torch's F.linear.
Eligible: CPU, bf16 weight, native library available (else nothing changes and `use_cpu_linears_`
says why); under autograd (grad enabled and a tensor requiring grad) F.linear runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moeinfer.kernels import native
from moeinfer.kernels.cpu import slow_half_matmul
from moeinfer.kernels.swap import swap_in_, swap_out_

# Rows from which path 3 (widen + fp32 GEMM) replaces path 2 (row product), and the fp32 bytes of a
# widened weight slice.
WIDEN_ROWS = 256
WIDEN_SLICE_BYTES = 32 << 20


def widened_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, C] fp32 @ w [O, C] (bf16)^T -> [N, O] fp32: w widened to fp32 one slice of output rows at a
    time (at most WIDEN_SLICE_BYTES), each slice multiplied by torch's fp32 GEMM."""
    out_features, in_features = w.shape
    step = max(1, WIDEN_SLICE_BYTES // (4 * in_features))
    if step >= out_features:
        return x @ w.float().t()
    y = x.new_empty(x.shape[0], out_features)
    for o in range(0, out_features, step):
        y[:, o:o + step] = x @ w[o:o + step].float().t()
    return y


class CpuLinear(nn.Linear):
    """nn.Linear whose forward runs the native CPU paths (module docstring); `engine` forces a
    native variant (default: the best this CPU runs)."""

    engine: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.device.type != "cpu" or w.dtype != torch.bfloat16 or (
                torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
            return F.linear(x, w, self.bias)  # the native paths do not differentiate
        lead = x.shape[:-1]
        n = x.numel() // self.in_features
        if n == 1:
            # 1. decode: one native GEMV; without a bias it takes x as it is and returns y [..., O] in x's
            # dtype (x widened and y rounded inside it), the only tensor it allocates
            variant = native.resolve_variant(self.engine)
            if self.bias is None and x.dtype in (torch.bfloat16, torch.float32):
                return native.load().gemv(x.contiguous(), w, variant)
            y = native.load().gemv(x.reshape(-1).float().contiguous(), w, variant)
        elif slow_half_matmul(torch.bfloat16) and n < WIDEN_ROWS:
            # 2. short prefill on AVX2: each weight row read once for all rows, widened in registers
            variant = native.resolve_variant(self.engine)
            y = native.load().linear_rows(x.reshape(n, self.in_features).float().contiguous(), w, variant)
        elif slow_half_matmul(torch.bfloat16):
            # 3. long prefill on AVX2: widened weight slices, fp32 GEMM
            y = widened_linear(x.reshape(n, self.in_features).float(), w)
        else:
            return F.linear(x, w, self.bias)  # 4.
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)


    def row_op(self, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Path 1 for one contiguous row of `dtype` with the weight and variant resolved once (a
        prepared step of moeinfer.engine.cpu_decode): the same call, so the same bits. None where
        path 1 does not take the row as it is (a bias, another dtype, no grad-free CPU bf16 weight)."""
        w = self.weight
        if (self.bias is not None or w.dtype != torch.bfloat16 or w.device.type != "cpu" or w.requires_grad
                or dtype not in (torch.bfloat16, torch.float32)):
            return None
        op, variant = native.load().gemv, native.resolve_variant(self.engine)
        return lambda x: op(x, w, variant)


def use_cpu_linears_(model: nn.Module, *, engine: str | None = None) -> int:
    """Turn every bf16 CPU nn.Linear of `model` into a CpuLinear, in place; returns how many.

    Raises RuntimeError naming the reason when the native library is unavailable, ValueError when
    `engine` names a variant this CPU cannot run."""
    return swap_in_(model, nn.Linear, CpuLinear, "use_cpu_linears_", engine=engine,
                    eligible=lambda m: m.weight.device.type == "cpu" and m.weight.dtype == torch.bfloat16)


def restore_linears_(model: nn.Module) -> int:
    """Undo `use_cpu_linears_`: CpuLinear modules become plain nn.Linear again; returns how many."""
    return swap_out_(model, CpuLinear, nn.Linear)
