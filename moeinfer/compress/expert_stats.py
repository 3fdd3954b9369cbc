"""What each expert does on calibration tokens: outputs, routed layer outputs, usage.

Shared by the methods that need activations (REAP, NAEE, merging by output, MoE-Pruner, OneS).
Shapes: N calibration tokens, D hidden, E experts, K top-k, I expert inner size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moeinfer.compress.registry import CompressionError
from moeinfer.model.mlp import swiglu_hidden
from moeinfer.model.moe import Experts, MoEBlock, Routing, route


def check_unmerged(block: MoEBlock, method: str) -> None:
    """Steps that re-shape experts run before merging (a merged layer's router maps experts)."""
    if getattr(block.gate, "expert_map", None) is not None:
        raise CompressionError(f"{method}: layer {block.layer_idx} holds merged experts; put pruning, "
                               f"sparse-to-dense and unstructured pruning before merge in the recipe")


def subsample(x: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """At most `max_tokens` rows of x [N, D], evenly spaced (deterministic)."""
    if x.shape[0] <= max_tokens:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, max_tokens).long()]


def expert_hidden(ex: Experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's inner activation silu(gate x) * up x: x [N, D] -> h [N, I] (fp32)."""
    return swiglu_hidden(x.float(), ex.gate_up_proj[e].float())


def expert_output(ex: Experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's output f_e(x): x [N, D] -> [N, D] (fp32)."""
    return F.linear(expert_hidden(ex, e, x), ex.down_proj[e].float())


def all_outputs(ex: Experts, x: torch.Tensor) -> torch.Tensor:
    """Every expert's output on every token: x [N, D] -> Y [E, N, D] (fp32)."""
    return torch.stack([expert_output(ex, e, x) for e in range(ex.num_experts)])


def subset_routing(block: MoEBlock, x: torch.Tensor, keep: Sequence[int]) -> Routing:
    """The routing of x [N, D] if the layer kept only experts `keep` (sorted); indices into `keep`."""
    g = block.gate
    idx = torch.as_tensor(list(keep), dtype=torch.long, device=g.weight.device)
    n_group = g.cfg.n_group if len(idx) % g.cfg.n_group == 0 else 1
    cfg = dataclasses.replace(g.cfg, num_experts=len(idx), n_group=n_group, topk_group=min(g.cfg.topk_group, n_group))
    bias = None if g.e_score_correction_bias is None else g.e_score_correction_bias[idx]
    return route(x, g.weight[idx], cfg, bias)


def combine_outputs(Y: torch.Tensor, routing: Routing, experts: Sequence[int] | None = None) -> torch.Tensor:
    """Routed layer output from precomputed outputs Y [E, N, D]: sum_k w[n,k] Y[e(n,k), n] -> [N, D].

    `experts` maps the routing's indices to rows of Y (a subset's indices are positions in it)."""
    idx = routing.indices
    if experts is not None:
        idx = torch.as_tensor(list(experts), dtype=torch.long, device=idx.device)[idx]
    n = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
    return (Y[idx, n] * routing.weights[..., None]).sum(1)  # [N, K, D] -> [N, D]


def usage(block: MoEBlock, routing: Routing) -> torch.Tensor:
    """Tokens routed to each expert, f [E] float."""
    idx = routing.indices.reshape(-1)
    return torch.bincount(idx[idx >= 0], minlength=block.gate.weight.shape[0]).float()


def gate_per_token(routing: Routing, num_experts: int) -> torch.Tensor:
    """Gate weight of every expert for every token (0 where not routed): G [N, E]."""
    G = torch.zeros(routing.indices.shape[0], num_experts, dtype=torch.float32)
    return G.scatter_add_(1, routing.indices, routing.weights.float())
