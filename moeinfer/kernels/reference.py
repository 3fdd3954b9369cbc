"""The `reference` kernel: the eager stages of moeinfer/model/moe.py (dispatch, expert_compute,
combine), plus expert-map handling. Every other backend is tested against it.

Shapes: N tokens, D hidden, E local experts, K top-k, S = N*K slots.
"""

from __future__ import annotations

import torch

from moeinfer.kernels.registry import register_kernel
from moeinfer.model.moe import combine, dispatch, expert_compute


def map_experts(indices: torch.Tensor, num_local: int, expert_map: torch.Tensor | None) -> torch.Tensor:
    """Global ids [N, K] -> local rows [N, K]; absent experts (map -1) become `num_local`."""
    if expert_map is None:
        return indices
    local = expert_map.to(indices.device)[indices]
    return torch.where(local >= 0, local, num_local)


@register_kernel("reference")
def reference_moe(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                  gate_up: torch.Tensor, down: torch.Tensor, *,
                  expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """Eager dispatch -> per-expert compute -> index_add combine (moeinfer.model.moe)."""
    E = gate_up.shape[0]
    local = map_experts(indices, E, expert_map)
    # 1. Absent experts form a trailing bucket E that is never computed; its slots get y = 0.
    d = dispatch(local, E + 1)
    y = expert_compute(x[d.tokens], d.counts[:E], gate_up, down)  # [S, D]
    y[int(d.counts[:E].sum()):] = 0
    return combine(y, d, weights, x.shape[0])
