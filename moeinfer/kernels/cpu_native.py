"""Glue between the MoE kernels and the native CPU library (moeinfer.kernels.native): which engine
runs a batch-1 expert stage, and the call itself.

Engines (`ENGINES`): "torch" (the torch ops of moeinfer.kernels.cpu), or a native variant
("generic", "avx2", "avx512", "amx"). `choose_engine(None)` picks the best native variant the CPU runs, else "torch";
a named engine is checked (a ValueError says why a CPU or build cannot run it, never a silent
substitution), so tests force each one.
"""

from __future__ import annotations

from collections.abc import Callable

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


def decode_rows_op(gate_up: torch.Tensor, down: torch.Tensor, *, engine: str) -> Callable[..., None]:
    """`moe_decode` without its sum over experts, on these stacks (gate_up [E, 2I, D], down [E, D, I], bf16 or
    fp32, contiguous): (x [1, D], rows [K] int64 stack rows (< 0: skipped), out [K, D] fp32) -> None, expert
    k's output row into out[k]; the row is `moe_decode`'s for that expert, whichever others the call holds."""
    op = native.load().moe_decode_rows

    def run(x: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        op(x if x.dtype in (torch.float32, torch.bfloat16) else x.float(), rows, gate_up, down, engine, out)

    return run


def rows_op(gate_up: torch.Tensor, down: torch.Tensor, *, engine: str) -> Callable[..., None]:
    """`moe_rows` without its sum over experts, on these stacks (gate_up [E, 2I, D], down [E, D, I], bf16 or
    fp32, contiguous): (x [N, D], rows [N, K] int64 stack rows (< 0: skipped), out [N * K, D] fp32) -> None,
    token n's k-th expert into out[n * K + k]: the row `moe_rows` sums for it, whichever other experts the
    call holds (`combine_token_rows` sums them alike)."""
    op = native.load().moe_rows_rows

    def run(x: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        op(x.float().contiguous(), rows, gate_up, down, engine, out)

    return run


def combine_rows(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The last step of the native batch-1 decodes alone: x [1, D] (bf16 or fp32: the output's dtype),
    indices [1, K] (< 0: skipped), weights [1, K], rows [K, D] fp32 -> sum_k weights[k] * rows[k] [1, D],
    summed and rounded as `moe_decode` and `moe_decode_q` sum theirs."""
    return native.load().combine_rows(x, indices, weights.float(), rows)


def combine_token_rows(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The last step of the native few-token expert stages (`moe_prefill_q`, `moe_rows`) alone: x [N, D], indices [N, K] (< 0:
    skipped), weights [N, K], rows [N * K, D] fp32 -> sum_k weights[n, k] * rows[n * K + k], [N, D] fp32,
    summed as `moe_prefill_q` and `moe_rows` sum their experts' rows."""
    return native.load().combine_token_rows(x, indices, weights.float(), rows)


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
