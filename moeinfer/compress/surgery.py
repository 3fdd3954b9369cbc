"""Structural edits of one MoE layer shared by pruning, merging and sparse-to-dense."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from moeinfer.compress.expert_stats import check_unmerged
from moeinfer.compress.registry import CompressionError
from moeinfer.compress.selection import check_balanced
from moeinfer.formats.layout import replace_experts_
from moeinfer.model.moe import Experts, MoEBlock


def plain_experts(block: MoEBlock, method: str) -> Experts:
    """The layer's stacked experts; other kinds (quantized, low-rank, offloaded) cannot be edited."""
    ex = block.experts
    if type(ex) is not Experts:
        raise CompressionError(f"{method} edits plain experts; layer {block.layer_idx} holds "
                               f"{type(ex).__name__} (put structural steps before quantize/low-rank)")
    return ex


def check_keep(block: MoEBlock, keep: int, method: str) -> None:
    E, k = block.gate.weight.shape[0], block.gate.cfg.top_k
    if keep > E:
        raise CompressionError(f"{method}: cannot keep {keep} experts in layer {block.layer_idx}: it has {E}")
    if keep < max(1, k):
        raise CompressionError(f"{method}: keeping {keep} experts in layer {block.layer_idx} is fewer than "
                               f"top_k={k}; keep at least {k}")


def keep_experts_(block: MoEBlock, keep: Sequence[int]) -> None:
    """Keep only experts `keep` (in that order); their router rows go with them, so the top-k over
    the remaining experts renormalises as the routing config says."""
    ex = plain_experts(block, "pruning")
    check_unmerged(block, "pruning")
    check_balanced(block, keep, "pruning")
    idx = torch.tensor(sorted(keep), dtype=torch.long, device=ex.gate_up_proj.device)
    new = Experts(len(idx), ex.gate_up_proj.shape[2], ex.down_proj.shape[2]).to(ex.gate_up_proj)
    new.gate_up_proj.data = ex.gate_up_proj.data[idx].clone()
    new.down_proj.data = ex.down_proj.data[idx].clone()
    new.requires_grad_(False)
    bias = block.gate.e_score_correction_bias
    replace_experts_(block, new, block.gate.weight[idx], None if bias is None else bias[idx])


def layer_keep_counts(blocks: Sequence[MoEBlock], *, keep: int | None, ratio: float | None,
                      method: str) -> list[int]:
    """Experts to keep per layer from `keep` (a count) or `ratio` (fraction of experts removed)."""
    if (keep is None) == (ratio is None):
        raise CompressionError(f"{method}: give exactly one of keep (experts kept per layer) or ratio "
                               f"(fraction of experts removed)")
    out = []
    for b in blocks:
        E = b.gate.weight.shape[0]
        n = keep if keep is not None else E - int(round(E * float(ratio)))
        check_keep(b, n, method)
        if n % b.gate.cfg.n_group:
            raise CompressionError(f"{method}: layer {b.layer_idx} uses group-limited routing with n_group="
                                   f"{b.gate.cfg.n_group}; the experts kept ({n}) must be divisible by it")
        out.append(n)
    return out


def prune_layers_(blocks: Sequence[MoEBlock], *, keep: int | None, ratio: float | None, method: str,
                  choose: Callable[[MoEBlock, int], list[int]], progress: bool = False) -> dict[str, list[int]]:
    """The steps every pruning method shares: per MoE layer, the number of experts to keep (`keep` or
    `ratio`, checked for every layer first), `choose(block, n)` -> the experts kept (the method's own
    criterion), then `keep_experts_`. Returns {layer: experts kept}."""
    counts = layer_keep_counts(blocks, keep=keep, ratio=ratio, method=method)
    kept: dict[str, list[int]] = {}
    for block, n in tqdm(list(zip(blocks, counts)), desc=method, unit="layer", disable=not progress or None):
        chosen = choose(block, n)
        keep_experts_(block, chosen)
        kept[str(block.layer_idx)] = chosen
    return kept
