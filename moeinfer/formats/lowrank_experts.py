"""LowRankExperts: each expert's two matrices as products of rank-r factors (a truncated SVD), with
a rank of its own per expert and matrix.

Shapes: E experts, D hidden, I expert inner size, r rank, S token-slots.
    gate_up_a.{e} [2I, r_gu[e]]   gate_up_b.{e} [r_gu[e], D]     gate_up_e ~ gate_up_a @ gate_up_b
    down_a.{e}    [D,  r_dn[e]]   down_b.{e}    [r_dn[e], I]     down_e    ~ down_a @ down_b
An expert with ranks (r_gu, r_dn) holds r_gu (2I + D) + r_dn (D + I) numbers instead of 3 I D.

Forward (moeinfer.model.moe's stages; only expert compute differs): dispatch; for each expert with
slots, x -> b then a (two thin matmuls per matrix, never the full weight); combine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moeinfer.formats.kinds import register_experts_kind
from moeinfer.config import ModelConfig
from moeinfer.model.moe import Routing, routed_forward


def _factors(shapes: Sequence[tuple[int, int]], dtype: torch.dtype) -> nn.ParameterList:
    return nn.ParameterList([nn.Parameter(torch.empty(*s, dtype=dtype), requires_grad=False) for s in shapes])


@register_experts_kind("lowrank")
class LowRankExperts(nn.Module):
    kernels = ("reference",)  # ExpertStage (moeinfer/model/moe.py): its own eager expert stage
    kernel = "reference"
    graph_safe = False

    def __init__(self, ranks_gate_up: Sequence[int], ranks_down: Sequence[int], hidden_size: int,
                 intermediate_size: int, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if len(ranks_gate_up) != len(ranks_down) or not ranks_gate_up:
            raise ValueError(f"need one gate_up and one down rank per expert, got {len(ranks_gate_up)} and "
                             f"{len(ranks_down)}")
        D, I = hidden_size, intermediate_size
        for r_gu, r_dn in zip(ranks_gate_up, ranks_down):
            if not (1 <= r_gu <= min(2 * I, D) and 1 <= r_dn <= min(D, I)):
                raise ValueError(f"ranks ({r_gu}, {r_dn}) out of range: gate_up 1..{min(2 * I, D)}, down 1..{min(D, I)}")
        self.ranks_gate_up, self.ranks_down = [int(r) for r in ranks_gate_up], [int(r) for r in ranks_down]
        self.hidden_size, self.intermediate_size = D, I
        self.gate_up_a = _factors([(2 * I, r) for r in self.ranks_gate_up], dtype)
        self.gate_up_b = _factors([(r, D) for r in self.ranks_gate_up], dtype)
        self.down_a = _factors([(D, r) for r in self.ranks_down], dtype)
        self.down_b = _factors([(r, I) for r in self.ranks_down], dtype)

    @property
    def num_experts(self) -> int:
        return len(self.ranks_gate_up)

    def layout_params(self) -> dict[str, Any]:
        return {"ranks_gate_up": list(self.ranks_gate_up), "ranks_down": list(self.ranks_down),
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size}

    @classmethod
    def empty(cls, num_experts: int, config: ModelConfig, params: dict[str, Any]) -> LowRankExperts:
        if len(params["ranks_gate_up"]) != num_experts:
            raise ValueError(f"low-rank experts: {len(params['ranks_gate_up'])} ranks for {num_experts} experts")
        return cls(params["ranks_gate_up"], params["ranks_down"], int(params.get("hidden_size", config.hidden_size)),
                   int(params.get("intermediate_size", config.moe_intermediate_size)))

    @classmethod
    @torch.no_grad()
    def from_svd(cls, factors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                 hidden_size: int, intermediate_size: int) -> LowRankExperts:
        """factors[e] = (gate_up_a, gate_up_b, down_a, down_b), already truncated."""
        dtype = factors[0][0].dtype
        m = cls([f[1].shape[0] for f in factors], [f[3].shape[0] for f in factors], hidden_size,
                intermediate_size, dtype=dtype)
        for e, (gua, gub, dna, dnb) in enumerate(factors):
            for plist, t in ((m.gate_up_a, gua), (m.gate_up_b, gub), (m.down_a, dna), (m.down_b, dnb)):
                plist[e] = nn.Parameter(t.contiguous(), requires_grad=False)
        return m

    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's full (gate_up [2I, D], down [D, I]) = a @ b."""
        return self.gate_up_a[e] @ self.gate_up_b[e], self.down_a[e] @ self.down_b[e]

    def dense_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.expert_weights(e) for e in range(self.num_experts)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [N, D] -> weighted sum of the routed experts' outputs [N, D]."""
        def expert(e: int, seg: torch.Tensor) -> torch.Tensor:
            h = F.linear(F.linear(seg, self.gate_up_b[e].to(x.dtype)), self.gate_up_a[e].to(x.dtype))  # [n, 2I]
            gate, up = h.chunk(2, dim=-1)
            return F.linear(F.linear(F.silu(gate) * up, self.down_b[e].to(x.dtype)), self.down_a[e].to(x.dtype))

        return routed_forward(x, routing, self.num_experts, expert)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, ranks_gate_up={self.ranks_gate_up}, ranks_down={self.ranks_down}, "
                f"D={self.hidden_size}, I={self.intermediate_size}")
