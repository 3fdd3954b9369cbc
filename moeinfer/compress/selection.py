"""Choosing which experts a layer keeps, respecting DeepSeek's expert groups.

Group-limited routing (DeepSeek-V2/V3, `n_group > 1`) views the experts as `n_group` contiguous
blocks. A pruned or merged layer keeps that routing only if every group keeps the same number of
experts, so each group keeps `n / n_group` of its own: a count not divisible by `n_group` is an error.

Shapes: E experts, G groups.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import combinations, product

import torch

from moeinfer.compress.registry import CompressionError
from moeinfer.model.moe import MoEBlock


def groups(block: MoEBlock) -> list[list[int]]:
    """The layer's expert groups (one group of all experts without group-limited routing)."""
    E, G = block.gate.weight.shape[0], block.gate.cfg.n_group
    size = E // G
    return [list(range(g * size, (g + 1) * size)) for g in range(G)]


def per_group(block: MoEBlock, n: int, method: str) -> int:
    """Experts each group keeps when the layer keeps `n`; a clear error when that is not whole."""
    G = block.gate.cfg.n_group
    if n % G:
        raise CompressionError(f"{method}: layer {block.layer_idx} uses group-limited routing with n_group={G}; "
                               f"the experts kept ({n}) must be divisible by {G} so every group keeps as many")
    if block.gate.cfg.group_score == "top2_sum" and n // G < 2:
        raise CompressionError(f"{method}: layer {block.layer_idx} scores its {G} expert groups by their two best "
                               f"experts (DeepSeek-V3); keeping {n} leaves fewer than 2 per group")
    return n // G


def select_top(block: MoEBlock, score: torch.Tensor, n: int, method: str) -> list[int]:
    """The `n` highest-scoring experts (score [E]), the same number from every group; sorted."""
    k = per_group(block, n, method)
    keep: list[int] = []
    for members in groups(block):
        s = score[members]
        keep += [members[i] for i in s.topk(k).indices.tolist()]
    return sorted(keep)


def subsets(block: MoEBlock, n: int, method: str) -> Iterator[list[int]]:
    """Every group-balanced subset of `n` experts, sorted."""
    k = per_group(block, n, method)
    for parts in product(*(combinations(members, k) for members in groups(block))):
        yield sorted(e for part in parts for e in part)


def count_subsets(block: MoEBlock, n: int, method: str) -> int:
    from math import comb

    k = per_group(block, n, method)
    return comb(len(groups(block)[0]), k) ** len(groups(block))


def check_balanced(block: MoEBlock, keep: Sequence[int], method: str) -> None:
    """Raise unless `keep` takes the same number of experts from every group."""
    G = block.gate.cfg.n_group
    if G == 1:
        return
    size = block.gate.weight.shape[0] // G
    counts = torch.bincount(torch.tensor(list(keep)) // size, minlength=G).tolist()
    if len(set(counts)) != 1:
        raise CompressionError(f"{method}: layer {block.layer_idx} would keep {counts} experts from its {G} "
                               f"routing groups; group-limited routing needs the same number from each")
