"""Random MoE problems shared by the kernel tests: x, routing, stacked expert weights, expert maps.

Shapes: N tokens, D hidden, E experts, K top-k, I inner size (D, I deliberately not multiples of 16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

D, I = 36, 20


@dataclass
class Problem:
    x: torch.Tensor  # [N, D]
    indices: torch.Tensor  # [N, K] global expert ids
    weights: torch.Tensor  # [N, K] fp32
    gate_up: torch.Tensor  # [E_local, 2I, D]
    down: torch.Tensor  # [E_local, D, I]
    expert_map: torch.Tensor | None = None  # [E] local row or -1

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.x, self.indices, self.weights, self.gate_up, self.down


def make_problem(*, N: int, E: int, K: int, dtype: torch.dtype = torch.float32, hot: int | None = None,
                 map_half: bool = False, d: int = D, i: int = I, seed: int = 0) -> Problem:
    """Routing picks K distinct experts per token among the first `hot` experts (default: all), so
    the others receive nothing. map_half keeps every other expert locally (others map to -1)."""
    g = torch.Generator().manual_seed(seed)
    pool = hot or E
    x = torch.randn(N, d, generator=g)
    indices = torch.stack([torch.randperm(pool, generator=g)[:K] for _ in range(N)]) if N else \
        torch.empty(0, K, dtype=torch.long)
    weights = torch.rand(N, K, generator=g)
    gate_up = torch.randn(E, 2 * i, d, generator=g) / d**0.5
    down = torch.randn(E, d, i, generator=g) / i**0.5
    expert_map = None
    if map_half:
        expert_map = torch.full((E,), -1, dtype=torch.long)
        kept = torch.arange(0, E, 2)
        expert_map[kept] = torch.arange(len(kept))
        gate_up, down = gate_up[kept].contiguous(), down[kept].contiguous()
    return Problem(x.to(dtype), indices, weights, gate_up.to(dtype), down.to(dtype), expert_map)


def tolerance(ref: torch.Tensor, dtype: torch.dtype) -> float:
    scale = float(ref.float().abs().max()) + 1e-6
    return scale * {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
