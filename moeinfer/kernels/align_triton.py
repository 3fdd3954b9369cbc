"""Block-aligned grouping of token-slots by expert in one Triton program: the same result as
moeinfer/kernels/align.py's `align_slots` (its torch ops are the reference), for the small slot
counts of decode, where that reference's ~30 tiny kernels cost more than the expert GEMMs they
feed (vLLM's `moe_align_block_size` is one CUDA kernel for the same reason).

Shapes: S slots, E local experts, M block size, P padded capacity, B = P / M blocks;
BS/BE/BP/BB the powers of two that hold S, E, a chunk of P and a chunk of B.

Steps (comments below carry the numbers):
1. counts per expert from the [S, E] one-hot of the slots' experts, rounded up to M; their running
   sums give each expert's padded segment;
2. each slot's rank among the earlier slots of its expert ([S, S] comparison: a stable sort);
3. padding everywhere, then each present slot id at its segment start + rank;
4. the expert of each block: how many segment ends lie at or before the block's start.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeinfer.kernels.align import AlignedSlots, align_slots, padded_capacity

MAX_SLOTS = 128  # BS: the [S, S] rank matrix stays in registers
MAX_CELLS = 32768  # BS * BE: the one-hot matrix


@triton.jit
def _align_kernel(local_ptr, slots_ptr, block_expert_ptr, S, E, P, B,
                  M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    ids = tl.load(local_ptr + offs_s, mask=s_ok, other=E).to(tl.int32)  # E = absent
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    # 1.
    onehot = (ids[:, None] == offs_e[None, :]) & s_ok[:, None] & e_ok[None, :]  # [S, E]
    counts = tl.sum(onehot.to(tl.int32), axis=0)
    padded = (counts + M - 1) // M * M
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    # 2.
    earlier = (ids[:, None] == ids[None, :]) & (offs_s[None, :] < offs_s[:, None])  # [S, S']: s' < s
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    start = tl.sum(tl.where(onehot, pad_start[None, :], 0), axis=1)
    present = s_ok & (ids < E)
    # 3.
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        tl.store(slots_ptr + offs_p, tl.zeros((BLOCK_P,), dtype=tl.int32) + S, mask=offs_p < P)
    tl.debug_barrier()
    tl.store(slots_ptr + start + rank, offs_s, mask=present)
    # 4.
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        ends_before = (pad_end[None, :] <= offs_b[:, None] * M) & e_ok[None, :]  # [B, E]
        expert = tl.sum(ends_before.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + offs_b, tl.where(expert < E, expert, -1), mask=offs_b < B)


def fits(num_slots: int, num_experts: int) -> bool:
    """Whether one program can align this many slots (else the torch reference does)."""
    bs = triton.next_power_of_2(max(num_slots, 1))
    return bs <= MAX_SLOTS and bs * triton.next_power_of_2(num_experts) <= MAX_CELLS


def align_slots_one_program(local: torch.Tensor, num_experts: int, block_m: int) -> AlignedSlots:
    """local [S] expert row of each slot (num_experts = absent) -> the result of align.align_slots."""
    S, E, M = local.numel(), num_experts, block_m
    if not fits(S, E):
        raise ValueError(f"align_slots_one_program: {S} slots x {E} experts exceed one program "
                         f"(at most {MAX_SLOTS} slots and {MAX_CELLS} slot-expert cells)")
    P = padded_capacity(S, E, M)
    B = P // M
    slots = torch.empty(P, dtype=torch.int32, device=local.device)
    block_expert = torch.empty(B, dtype=torch.int32, device=local.device)
    if S == 0:
        return AlignedSlots(slots=slots, block_expert=block_expert, block_m=M)
    bs, be = triton.next_power_of_2(max(S, 1)), triton.next_power_of_2(E)
    _align_kernel[(1,)](local.contiguous(), slots, block_expert, S, E, P, B, M=M, BLOCK_S=bs, BLOCK_E=be,
                        BLOCK_P=min(triton.next_power_of_2(P), 1024), BLOCK_B=min(triton.next_power_of_2(B), 64),
                        num_warps=4 if bs * be <= 8192 else 8)
    return AlignedSlots(slots=slots, block_expert=block_expert, block_m=M)


def align_for_kernel(local: torch.Tensor, num_experts: int, block_m: int) -> AlignedSlots:
    """One program where it fits (decode), else align.align_slots' torch ops (prefill, where the GEMMs
    dwarf them)."""
    if fits(local.numel(), num_experts):
        return align_slots_one_program(local, num_experts, block_m)
    return align_slots(local, num_experts, block_m)
