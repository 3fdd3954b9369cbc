"""Glue between the MoE kernels and the native CPU library (moeinfer.kernels.native): which engine
runs a batch-1 expert stage, and the call itself.

Engines (`ENGINES`): "torch" (the torch ops of moeinfer.kernels.cpu), or a native variant
("generic", "avx2", "avx512", "amx"). `choose_engine(None)` picks the best native variant the CPU runs, else "torch";
a named engine is checked (a ValueError says why a CPU or build cannot run it, never a silent
substitution), so tests force each one.
"""

from __future__ import annotations

import torch

from moeinfer.kernels import native

ENGINES = ("torch", *native.VARIANTS)


def choose_engine(engine: str | None) -> str:
    """`engine` validated, or the best available one ('torch' when the native library is unavailable)."""
    if engine is None:
        return native.best_variant() or "torch"
    if engine not in ENGINES:
        raise ValueError(f"unknown cpu engine {engine!r}; valid: {', '.join(ENGINES)}")
    if engine != "torch":
        native.resolve_variant(engine)
    return engine


def local_experts(indices: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    """Global expert ids [..., K] -> local rows [..., K] (-1 = not held here)."""
    if expert_map is None:
        return indices
    return expert_map.to(indices.device)[indices]


def moe_decode(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor, *, expert_map: torch.Tensor | None, engine: str) -> torch.Tensor:
    """x [1, D] -> [1, D] in x's dtype: the K routed experts of one token in one native call (bf16/fp32
    weights; a bf16 or fp32 x is widened and the result rounded inside it, other dtypes go through fp32)."""
    xn = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
    out = native.load().moe_decode(xn.contiguous(), local_experts(indices, expert_map), weights.float(),
                                   gate_up.contiguous(), down.contiguous(), engine)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def moe_rows(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
             down: torch.Tensor, *, expert_map: torch.Tensor | None, engine: str) -> torch.Tensor:
    """x [N, D] -> [N, D]: every token's routed experts in one native call (csrc/moe_rows.cpp), each
    expert's bf16/fp32 weight rows read once for all of its tokens."""
    experts = local_experts(indices, expert_map).long().contiguous()
    out = native.load().moe_rows(x.float().contiguous(), experts, weights.float().contiguous(), gate_up.contiguous(),
                                 down.contiguous(), engine)
    return out.to(x.dtype)


def native_weights(gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """The native expert stage reads these weights (bf16 or fp32, CPU, same dtype)."""
    return (gate_up.device.type == "cpu" and gate_up.dtype == down.dtype
            and gate_up.dtype in (torch.bfloat16, torch.float32))
