"""Unstructured pruning inside experts (MoE-Pruner, Xie et al., 2024, "MoE-Pruner: Pruning
Mixture-of-Experts Large Language Model using the Hints from Its Router").

A weight matters as much as its magnitude times the size of what it multiplies, where each token's
input counts as much as the router weight that sent it to this expert (Wanda's metric, weighted by
the gate). Pruned weights are stored as zeros in the dense tensors: the checkpoint does not shrink
and no sparse kernel runs; the summary reports the sparsity reached. Inputs come from the
calibration pass over the unpruned model (layers are not re-calibrated one after another).

Shapes: N calibration tokens, D hidden, I expert inner size; gate_up [2I, D], down [D, I] per expert.

Steps:
1. route the calibration tokens; for expert e, its tokens x_n with gate weights g_n;
2. input norms: a_j = ||g * x[:, j]||_2 over those tokens for gate_up, and the same over the inner
   activations h = silu(gate x) * up x for down (an expert no token chose: a_j = 1, magnitude only);
3. score_ij = |W_ij| * a_j;
4. in every output row, zero the `sparsity` fraction of weights with the lowest score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeinfer.compress.calibration import CalibrationData
from moeinfer.compress.expert_stats import check_unmerged, expert_hidden
from moeinfer.compress.registry import register_method
from moeinfer.compress.surgery import plain_experts
from moeinfer.model.moe import MoEBlock, route
from moeinfer.model.transformer import MoEModel


@dataclass(frozen=True)
class UnstructuredPruneParams:
    sparsity: float = 0.5  # fraction of each expert matrix's weights set to zero
    router_weighted: bool = True  # False: plain Wanda (|W| x input norm)

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")


def prune_rows_(w: torch.Tensor, norms: torch.Tensor, sparsity: float) -> int:
    """Steps 3-4 on w [R, C] with input norms [C]; returns the weights zeroed."""
    n = int(w.shape[1] * sparsity)
    if n == 0:
        return 0
    score = w.abs().float() * norms.float()[None, :]
    drop = score.topk(n, dim=1, largest=False).indices
    w.scatter_(1, drop, 0)
    return drop.numel()


def prune_layer_(block: MoEBlock, x: torch.Tensor, p: UnstructuredPruneParams) -> tuple[int, int]:
    """Prune every expert of one layer; returns (zeroed, total) weights."""
    ex = plain_experts(block, "prune_unstructured")
    g = block.gate
    r = route(x, g.weight, g.cfg, g.e_score_correction_bias)  # 1. route
    zeroed = total = 0
    for e in range(ex.num_experts):
        hit = r.indices == e
        rows = hit.any(-1).nonzero().squeeze(1)
        gu, dn = ex.gate_up_proj.data[e], ex.down_proj.data[e]
        if len(rows) == 0:
            a_in, a_h = torch.ones(gu.shape[1]), torch.ones(dn.shape[1])
        else:
            gate = (r.weights[rows] * hit[rows]).sum(-1, keepdim=True) if p.router_weighted else 1.0
            xe = x[rows].float()
            a_in = (gate * xe).norm(dim=0)  # 2. input norms
            a_h = (gate * expert_hidden(ex, e, xe)).norm(dim=0)
        zeroed += prune_rows_(gu, a_in, p.sparsity) + prune_rows_(dn, a_h, p.sparsity)
        total += gu.numel() + dn.numel()
    return zeroed, total


@register_method("prune_unstructured", params=UnstructuredPruneParams, needs="activations")
def prune_unstructured(model: MoEModel, p: UnstructuredPruneParams, calib: CalibrationData, *,
                       progress: bool = True) -> dict[str, Any]:
    """Zero the expert weights with least |W| x router-weighted input norm (MoE-Pruner style)."""
    from tqdm.auto import tqdm

    zeroed = total = 0
    for block in tqdm(model.moe_blocks(), desc="prune_unstructured", unit="layer", disable=not progress or None):
        check_unmerged(block, "prune_unstructured")
        z, t = prune_layer_(block, calib.layer(block).x, p)
        zeroed, total = zeroed + z, total + t
    return {"expert_sparsity": round(zeroed / max(total, 1), 6), "zeroed_weights": zeroed,
            "stored": "dense (zeros kept in the tensors)"}
