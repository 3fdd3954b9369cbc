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
4. Combine with one index_add over the slots' tokens, accumulating in fp32.
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


@register_kernel("cpu")
def cpu_moe(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
            gate_up: torch.Tensor, down: torch.Tensor, *,
            expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted slots, GEMMs for active experts only (or two bmm's when all are busy), fp32 combine."""
    N, K = indices.shape
    E = gate_up.shape[0]
    flat = indices.reshape(-1)
    if expert_map is not None:
        flat = expert_map.to(flat.device)[flat]
        flat = torch.where(flat >= 0, flat, E)
    # 1. Slots sorted by expert; slots of absent experts (id E) sort last and are cut off.
    order = torch.argsort(flat, stable=True)  # [S]
    counts = torch.bincount(flat, minlength=E + 1)[:E]
    counts_host = counts.tolist()
    present = sum(counts_host)
    order = order[:present]
    tokens = order // K  # [S'] token of each sorted slot
    w = weights.reshape(-1)[order].float()  # [S']
    out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
    if present == 0:
        return out.to(x.dtype)
    xs = x[tokens]  # [S', D]
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
    # 4. Weighted combine in fp32.
    return out.index_add_(0, tokens, y.float().mul_(w[:, None])).to(x.dtype)
