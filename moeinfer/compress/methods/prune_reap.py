"""Expert pruning by router-weighted expert activation (REAP, Lasby et al., 2025, "REAP the Experts:
Why Pruning Prevails for One-Shot MoE Compression").

An expert matters as much as what it adds to the tokens that choose it: its saliency is the mean,
over the calibration tokens routed to it, of gate weight x the norm of its output.

Task-specific pruning (TSEP-style): calibrate on one domain, e.g. keep the experts Python needs with
`moeinfer compress --recipe prune_reap --set keep=6 --calibration python` (or a recipe's
`calibration: python`, or a text file of the task).

Shapes: N calibration tokens, D hidden, E experts, K top-k.

Steps:
1. route the calibration tokens x [N, D] with the layer's current router;
2. run every expert on the tokens routed to it: ||f_e(x_n)||_2;
3. saliency S_e = mean over those tokens of g_e(x_n) * ||f_e(x_n)||_2 (0 for an expert no token chose);
4. keep the `keep` most salient experts (the same number from every DeepSeek group); the router's
   rows go with the removed experts and the top-k renormalises over those left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeinfer.compress.calibration import CalibrationData
from moeinfer.compress.expert_stats import check_unmerged, expert_output
from moeinfer.compress.registry import register_method
from moeinfer.compress.selection import select_top
from moeinfer.compress.surgery import plain_experts, prune_layers_
from moeinfer.model.moe import MoEBlock, route
from moeinfer.model.transformer import MoEModel


@dataclass(frozen=True)
class ReapPruneParams:
    keep: int | None = None  # experts kept per layer
    ratio: float | None = None  # or: fraction of each layer's experts removed

    def __post_init__(self) -> None:
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")


def reap_saliency(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """S [E]: mean over routed tokens of gate weight x expert output norm (steps 1-3)."""
    ex = plain_experts(block, "prune_reap")
    g = block.gate
    r = route(x, g.weight, g.cfg, g.e_score_correction_bias)  # 1. route
    E = ex.num_experts
    score = torch.zeros(E)
    for e in range(E):
        hit = (r.indices == e)  # [N, K]
        rows = hit.any(-1).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        norm = expert_output(ex, e, x[rows]).norm(dim=-1)  # 2. ||f_e(x)||
        gate = (r.weights[rows] * hit[rows]).sum(-1)
        score[e] = (gate * norm).mean()  # 3. saliency
    return score


@register_method("prune_reap", params=ReapPruneParams, needs="activations")
def prune_reap(model: MoEModel, p: ReapPruneParams, calib: CalibrationData, *,
               progress: bool = True) -> dict[str, Any]:
    """Remove the experts with the least router-weighted output norm (REAP-style saliency)."""
    saliency: dict[str, list[float]] = {}

    def choose(block: MoEBlock, n: int) -> list[int]:
        check_unmerged(block, "prune_reap")
        score = reap_saliency(block, calib.layer(block).x)
        saliency[str(block.layer_idx)] = [round(float(s), 6) for s in score]
        return select_top(block, score, n, "prune_reap")  # 4. keep the most salient

    kept = prune_layers_(model.moe_blocks(), keep=p.keep, ratio=p.ratio, method="prune_reap", choose=choose,
                         progress=progress)
    return {"kept": kept, "saliency": saliency}
