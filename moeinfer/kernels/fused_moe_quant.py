"""The fused Triton MoE (moeinfer/kernels/fused_moe.py) over a QuantizedExperts module: the packed
weight format of that kernel, read from the module's stacks, with the checks of what it covers.

Every expert of a layer must have the same width b in {2, 4, 8} (fused_moe.py's docstring gives
the storage); mixed widths in one layer and 3-bit codes (which straddle bytes) are not handled:
callers keep the eager path (`quantized_unsupported` says why).

Shapes: N tokens, D hidden, E experts, K top-k, I inner size, P(C) packed bytes of a row of C
codes, G(C) groups of a row.
"""

from __future__ import annotations

from typing import Protocol

import torch

from moeinfer.kernels.configs import KernelConfig
from moeinfer.kernels.fused_moe import PACKED_BITS, ExpertWeights, fit_to_groups, moe

FUSED_BITS = PACKED_BITS
__all__ = ["FUSED_BITS", "PackedExperts", "fit_to_groups", "fused_moe_packed", "fused_moe_quantized",
           "packed_weights", "quantized_unsupported"]


class PackedExperts(Protocol):
    """What the kernel reads of moeinfer.formats.quantized_experts.QuantizedExperts (not imported:
    kernels sit below formats); the stacks are attributes q{b}_gate_up, s{b}_gate_up, ...."""

    bits: list[int]
    group_size: int
    hidden_size: int
    intermediate_size: int


def quantized_unsupported(experts: PackedExperts) -> str | None:
    """Why the fused kernel cannot run these experts (None = it can)."""
    widths = sorted(set(experts.bits))
    if len(widths) != 1:
        return f"mixed bit widths {widths} in one layer"
    if widths[0] not in FUSED_BITS:
        return f"{widths[0]}-bit codes (fused: {', '.join(map(str, FUSED_BITS))})"
    return None


def packed_weights(q_gate_up: torch.Tensor, s_gate_up: torch.Tensor, z_gate_up: torch.Tensor,
                   q_down: torch.Tensor, s_down: torch.Tensor, z_down: torch.Tensor, *,
                   bits: int, group_size: int, hidden_size: int, intermediate_size: int) -> ExpertWeights:
    """The packed stacks (fused_moe.py's docstring), checked, as the kernel's ExpertWeights."""
    if bits not in FUSED_BITS:
        raise ValueError(f"fused quantized MoE: unsupported bit width {bits}; supported: "
                         f"{', '.join(map(str, FUSED_BITS))}")
    D, I = hidden_size, intermediate_size
    E = q_gate_up.shape[0]
    G_d, G_i = -(-D // group_size), -(-I // group_size)
    per_byte = 8 // bits
    expected = {"q_gate_up": (E, 2 * I, None), "s_gate_up": (E, 2 * I, G_d), "z_gate_up": (E, 2 * I, G_d),
                "q_down": (E, D, None), "s_down": (E, D, G_i), "z_down": (E, D, G_i)}
    given = {"q_gate_up": q_gate_up, "s_gate_up": s_gate_up, "z_gate_up": z_gate_up,
             "q_down": q_down, "s_down": s_down, "z_down": z_down}
    for name, t in given.items():
        rows_cols = expected[name]
        if t.dim() != 3 or t.shape[:2] != rows_cols[:2] or (rows_cols[2] is not None and t.shape[2] != rows_cols[2]):
            raise ValueError(f"fused quantized MoE: {name} has shape {tuple(t.shape)}, expected "
                             f"{tuple(d if d is not None else 'P' for d in rows_cols)} (D={D}, I={I}, "
                             f"group_size={group_size})")
    if q_gate_up.shape[2] * per_byte < D or q_down.shape[2] * per_byte < I:
        raise ValueError(f"fused quantized MoE: packed rows too short for {bits}-bit codes of D={D}, I={I}")
    if s_gate_up.stride() != z_gate_up.stride() or s_down.stride() != z_down.stride():
        s_gate_up, z_gate_up = s_gate_up.contiguous(), z_gate_up.contiguous()
        s_down, z_down = s_down.contiguous(), z_down.contiguous()
    return ExpertWeights(q_gate_up, q_down, I, bits=bits, group_size=group_size, s_gate_up=s_gate_up,
                         z_gate_up=z_gate_up, s_down=s_down, z_down=z_down)


def fused_moe_packed(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                     q_gate_up: torch.Tensor, s_gate_up: torch.Tensor, z_gate_up: torch.Tensor,
                     q_down: torch.Tensor, s_down: torch.Tensor, z_down: torch.Tensor, *,
                     bits: int, group_size: int, intermediate_size: int,
                     expert_map: torch.Tensor | None = None, shared: ExpertWeights | None = None,
                     shared_weight: torch.Tensor | None = None,
                     config: KernelConfig | None = None) -> torch.Tensor:
    """x [N, D], indices/weights [N, K], packed stacks -> out [N, D] in x's dtype; expert_map and a
    shared expert as fused_moe.moe."""
    ew = packed_weights(q_gate_up, s_gate_up, z_gate_up, q_down, s_down, z_down, bits=bits, group_size=group_size,
                        hidden_size=x.shape[-1], intermediate_size=intermediate_size)
    return moe(x, indices, weights, ew, expert_map=expert_map, shared=shared, shared_weight=shared_weight,
               config=config)


def fused_moe_quantized(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                        experts: PackedExperts, *, expert_map: torch.Tensor | None = None,
                        shared: ExpertWeights | None = None, shared_weight: torch.Tensor | None = None,
                        config: KernelConfig | None = None) -> torch.Tensor:
    """x [N, D], indices/weights [N, K] over a QuantizedExperts of one width in {2, 4, 8} -> out [N, D].

    Equals QuantizedExperts' eager forward up to accumulation order; raises ValueError for layers the
    kernel does not cover (mixed widths, 3-bit), which run the eager path instead.
    """
    why = quantized_unsupported(experts)
    if why is not None:
        raise ValueError(f"fused quantized MoE cannot run this layer: {why}")
    b = experts.bits[0]
    if x.shape[-1] != experts.hidden_size:
        raise ValueError(f"fused quantized MoE: x has {x.shape[-1]} columns, experts expect D={experts.hidden_size}")
    stacks = [getattr(experts, f"{kind}{b}_{m}") for m in ("gate_up", "down") for kind in ("q", "s", "z")]
    return fused_moe_packed(x, indices, weights, *stacks, bits=b, group_size=experts.group_size,
                            intermediate_size=experts.intermediate_size, expert_map=expert_map, shared=shared,
                            shared_weight=shared_weight, config=config)
