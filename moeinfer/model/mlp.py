"""SwiGLU feed-forward (Shazeer, 2020): down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert from its stacked weights: x [n, D], gate_up [2I, D] (gate rows first),
    down [D, I] -> down(silu(gate x) * up x) [n, D]. Every eager expert computation uses this."""
    return F.linear(swiglu_hidden(x, gate_up), down)


def swiglu_hidden(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """The inner activation of `swiglu`: x [n, D], gate_up [2I, D] -> silu(gate x) * up x [n, I]."""
    return silu_and_mul(F.linear(x, gate_up))


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """h [..., 2I] = (gate x, up x) -> silu(gate x) * up x [..., I]: the activation every expert path
    (eager, grouped CPU kernels, dequantized tiles) applies to its gate_up product."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
