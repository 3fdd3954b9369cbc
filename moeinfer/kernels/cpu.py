"""The `cpu` kernel: grouped expert compute for CPUs, in the spirit of MegaBlocks' "sort tokens by
expert, then one GEMM per group" (Gale et al., 2023) without a Python loop over idle experts.

Shapes: N tokens, D hidden, E local experts, K top-k, I inner size, S = N*K slots, A active experts,
C the most slots any active expert received.

Steps:
1. Map and sort the S slots by expert (absent experts last, dropped); count slots per expert.
2. Pick a schedule from the counts (one host read, free on a CPU):
   - padded: when every expert is active and padding to C wastes little, the slots are scattered
     into a [E, C, D] batch and both projections are two `bmm`s straight on the stacked weights;
   - grouped: otherwise, one GEMM pair per *active* expert on its contiguous slot rows.
3. SiLU(gate) * up, down projection, multiply by the routing weight.
4. Combine: put the outputs back in slot order and weight each token's K rows in one bmm
   (a scatter-add over threads was slow here). Batch-1 decode skips sorting (K matvecs on views).
Matmuls run on torch's intra-op pool, so all cores are used (`torch.set_num_threads`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeinfer.kernels.registry import register_kernel

PADDED_WASTE = 1.5  # use the padded bmm schedule when E * C <= PADDED_WASTE * S


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def _one_token(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    """Batch-1 decode: K matrix-vector pairs on views of the chosen experts, no sorting, no copies."""
    experts = indices[0].tolist()
    if expert_map is not None:
        experts = [int(expert_map[e]) for e in experts]
    ys = [F.linear(_swiglu(F.linear(x, gate_up[e])), down[e]) if e >= 0 else x.new_zeros(x.shape)
          for e in experts]  # K x [1, D]
    return torch.mm(weights.to(x.dtype), torch.cat(ys))  # [1, K] @ [K, D]


@register_kernel("cpu")
def cpu_moe(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
            gate_up: torch.Tensor, down: torch.Tensor, *,
            expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted slots, GEMMs for active experts only (or two bmm's when all are busy), one weighted sum."""
    N, K = indices.shape
    E = gate_up.shape[0]
    if N == 1:
        return _one_token(x, indices, weights, gate_up, down, expert_map)
    flat = indices.reshape(-1)
    if expert_map is not None:
        flat = expert_map.to(flat.device)[flat]
        flat = torch.where(flat >= 0, flat, E)
    # 1. Slots sorted by expert; slots of absent experts (id E) sort last and are cut off.
    order = torch.argsort(flat, stable=True)  # [S]
    counts = torch.bincount(flat, minlength=E + 1)[:E]
    counts_host = counts.tolist()
    present = sum(counts_host)
    y_slots = x.new_zeros(N * K, x.shape[1])  # [S, D] expert output of each slot, in slot order
    if present:
        order = order[:present]
        xs = x[order // K]  # [S', D]
        C = max(counts_host)
        # 2-3. Expert compute on one of two schedules.
        if min(counts_host) > 0 and E * C <= PADDED_WASTE * present and C > 1:
            starts = torch.cumsum(counts, 0) - counts  # [E]
            expert_of = flat[order]  # [S'] sorted expert ids
            row = torch.arange(present, device=x.device) - starts[expert_of]
            batch = x.new_zeros(E, C, x.shape[1])
            batch[expert_of, row] = xs
            h = _swiglu(torch.bmm(batch, gate_up.transpose(1, 2)))  # [E, C, I]
            y = torch.bmm(h, down.transpose(1, 2))[expert_of, row]  # [S', D]
        else:
            y = torch.empty_like(xs)
            start = 0
            for e, n in enumerate(counts_host):
                if n:
                    seg = slice(start, start + n)
                    y[seg] = F.linear(_swiglu(F.linear(xs[seg], gate_up[e])), down[e])
                    start += n
        y_slots[order] = y
    # 4. Combine: each token's K outputs weighted in one batched product (no scatter-add).
    return torch.bmm(weights.to(x.dtype).view(N, 1, K), y_slots.view(N, K, -1)).view(N, -1)
