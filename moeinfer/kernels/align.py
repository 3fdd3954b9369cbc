"""Block-aligned grouping of token-slots by expert (the "moe_align_block_size" step of vLLM's
fused_moe; MegaBlocks' padded bins), in torch ops with static output shapes: no host
synchronisation, so it can be captured in a CUDA graph.

Shapes: S = N*K slots, E local experts, M block size, P = padded slot capacity (a multiple of M),
B = P / M blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AlignedSlots:
    slots: torch.Tensor  # [P] int32 slot id (n*K + k) per padded row, sorted by expert; S marks padding
    block_expert: torch.Tensor  # [B] int32 local expert of each block, -1 for unused blocks
    block_m: int


def padded_capacity(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound on sum_e ceil(count_e / M) * M, fixed by the shapes alone."""
    busy = min(num_experts, num_slots)  # at most one partly filled block per expert with slots
    return -(-(num_slots + busy * (block_m - 1)) // block_m) * block_m


def align_slots(local: torch.Tensor, num_experts: int, block_m: int) -> AlignedSlots:
    """local [S] expert row of each slot (num_experts = absent, dropped) -> padded, sorted slots.

    1. count slots per expert and round each count up to a multiple of M;
    2. the sorted position of every slot inside its expert's padded segment;
    3. scatter slot ids there (absent slots go to a dump row past the end);
    4. the expert of each block from the padded segment ends.
    """
    S, E, M = local.numel(), num_experts, block_m
    device = local.device
    P = padded_capacity(S, E, M)
    # 1.
    # scatter_add, not bincount: bincount on CUDA reads the maximum back to the host.
    counts = torch.zeros(E + 1, dtype=torch.long, device=device).scatter_add_(0, local, torch.ones_like(local))[:E]
    padded = (counts + M - 1) // M * M
    pad_end = torch.cumsum(padded, 0)  # [E]
    pad_start = pad_end - padded
    start = torch.cumsum(counts, 0) - counts
    # 2.
    order = torch.argsort(local, stable=True)  # [S]
    expert = local[order]
    present = expert < E
    e = expert.clamp(max=E - 1)
    dest = pad_start[e] + torch.arange(S, device=device) - start[e]
    dest = torch.where(present, dest, P)
    # 3.
    slots = torch.full((P + 1,), S, dtype=torch.int32, device=device)
    slots.scatter_(0, dest, order.to(torch.int32))
    # 4.
    block_start = torch.arange(0, P, M, device=device)
    block_expert = torch.searchsorted(pad_end, block_start, right=True)
    block_expert = torch.where(block_expert < E, block_expert, -1).to(torch.int32)
    return AlignedSlots(slots=slots[:P], block_expert=block_expert, block_m=M)
