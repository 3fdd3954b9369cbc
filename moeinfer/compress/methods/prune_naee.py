"""Expert pruning by layer-wise reconstruction search (NAEE, Lu et al., 2024, "Not All Experts are
Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts Large Language Models").

For each layer, the kept subset is the one whose layer output on calibration tokens stays closest to
the unpruned layer's, with the pruned layer's own routing (the router restricted to the subset,
its top-k renormalised). NAEE enumerates every subset; with many experts that is too many, so past
`max_candidates` subsets a greedy search removes one expert at a time (each time the one whose
removal changes the output least).

Task-specific pruning (TSEP-style): calibrate on one domain (`--calibration python`, a recipe's
`calibration: python`, or a text file of the task); see prune_reap.

Shapes: N calibration tokens, D hidden, E experts, K top-k.

Steps:
1. every expert's output on every calibration token, Y [E, N, D], and the unpruned output
   F = sum_k w[n,k] Y[e(n,k), n];
2. for each candidate subset S: route the tokens over S only, F_S = the routed sum over S,
   loss(S) = ||F - F_S||_F^2 / N;
3. candidates: every subset of `keep` (group-balanced for DeepSeek), or the greedy removal path;
4. keep the subset with the least loss; the router's rows go with the removed experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moeinfer.compress.calibration import CalibrationData
from moeinfer.compress.expert_stats import (
    all_outputs,
    check_unmerged,
    combine_outputs,
    subsample,
    subset_routing,
)
from moeinfer.compress.registry import register_method
from moeinfer.compress.selection import count_subsets, groups, per_group, subsets
from moeinfer.compress.surgery import plain_experts, prune_layers_
from moeinfer.model.moe import MoEBlock
from moeinfer.model.transformer import MoEModel


@dataclass(frozen=True)
class NaeePruneParams:
    keep: int | None = None  # experts kept per layer
    ratio: float | None = None  # or: fraction of each layer's experts removed
    search: str = "auto"  # "exhaustive", "greedy", or "auto" (exhaustive up to max_candidates subsets)
    max_candidates: int = 1000
    max_tokens: int = 4096  # calibration tokens used per layer (Y is E x tokens x D floats)

    def __post_init__(self) -> None:
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.search not in ("auto", "exhaustive", "greedy"):
            raise ValueError(f"search must be 'auto', 'exhaustive' or 'greedy', got {self.search!r}")
        if self.max_candidates < 1 or self.max_tokens < 1:
            raise ValueError("max_candidates and max_tokens must be >= 1")


def _loss(block: MoEBlock, x: torch.Tensor, Y: torch.Tensor, F: torch.Tensor, keep: Sequence[int]) -> float:
    F_S = combine_outputs(Y, subset_routing(block, x, keep), keep)  # 2. the pruned layer's output
    return float((F - F_S).pow(2).sum()) / x.shape[0]


def _greedy(block: MoEBlock, x: torch.Tensor, Y: torch.Tensor, F: torch.Tensor, n: int) -> tuple[list[int], float]:
    """Remove one expert at a time, always from a group that still has more than its share."""
    share = per_group(block, n, "prune_naee")
    keep = list(range(Y.shape[0]))
    loss = 0.0
    while len(keep) > n:
        best: tuple[float, int] | None = None
        for members in groups(block):
            left = [e for e in keep if e in members]
            if len(left) <= share:
                continue
            for e in left:
                trial = _loss(block, x, Y, F, [k for k in keep if k != e])
                if best is None or trial < best[0]:
                    best = (trial, e)
        assert best is not None
        loss, drop = best
        keep.remove(drop)
    return keep, loss


def naee_search(block: MoEBlock, x: torch.Tensor, n: int, p: NaeePruneParams) -> tuple[list[int], float, str]:
    """The subset of `n` experts to keep, its loss, and the search used (steps 1-4)."""
    ex = plain_experts(block, "prune_naee")
    Y = all_outputs(ex, x)  # 1. outputs of every expert [E, N, D]
    F = combine_outputs(Y, subset_routing(block, x, list(range(ex.num_experts))))  # the unpruned output
    search = p.search
    if search == "auto":
        search = "exhaustive" if count_subsets(block, n, "prune_naee") <= p.max_candidates else "greedy"
    if search == "greedy":
        keep, loss = _greedy(block, x, Y, F, n)
        return keep, loss, search
    best: tuple[float, list[int]] | None = None
    for S in subsets(block, n, "prune_naee"):  # 3. every candidate
        loss = _loss(block, x, Y, F, S)
        if best is None or loss < best[0]:
            best = (loss, S)
    assert best is not None
    return best[1], best[0], search


@register_method("prune_naee", params=NaeePruneParams, needs="activations")
def prune_naee(model: MoEModel, p: NaeePruneParams, calib: CalibrationData, *,
               progress: bool = True) -> dict[str, Any]:
    """Keep the subset of experts whose layer output changes least on calibration data (NAEE)."""
    losses: dict[str, float] = {}
    searches: set[str] = set()

    def choose(block: MoEBlock, n: int) -> list[int]:
        check_unmerged(block, "prune_naee")
        x = subsample(calib.layer(block).x, p.max_tokens)
        keep, loss, search = naee_search(block, x, n, p)
        losses[str(block.layer_idx)] = round(loss, 6)
        searches.add(search)
        return keep  # 4. keep the best subset

    kept = prune_layers_(model.moe_blocks(), keep=p.keep, ratio=p.ratio, method="prune_naee", choose=choose,
                         progress=progress)
    return {"kept": kept, "reconstruction_loss": losses, "search": sorted(searches)}
