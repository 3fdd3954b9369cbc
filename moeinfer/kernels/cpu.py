"""The `cpu` kernel: grouped expert compute for CPUs, in the spirit of MegaBlocks' "sort tokens by
expert, then one GEMM per group" (Gale et al., 2023) without a Python loop over idle experts.

Shapes: N tokens, D hidden, E local experts, K top-k, I inner size, S = N*K slots, A active experts,
C the most slots any active expert received.

Steps:
1. Map and sort the S slots by expert (absent experts last, dropped); count slots per expert.
2. Pick a schedule from the counts (one host read, free on a CPU):
   - padded: when there are many experts, all active, and padding to C wastes little, the slots are scattered
     into a [E, C, D] batch and both projections are two `bmm`s straight on the stacked weights;
   - grouped: otherwise, one GEMM pair per *active* expert on its contiguous slot rows.
3. SiLU(gate) * up, down projection, multiply by the routing weight.
4. Combine: put the outputs back in slot order and sum each token's K weighted rows
   (a scatter-add over threads was slow here). Batch-1 decode skips sorting (K matvecs on views).
Matmuls run on torch's intra-op pool, so all cores are used (`torch.set_num_threads`).
On CPUs without native bf16/fp16 matmul (AVX2) an expert with >= 2 rows is computed in fp32 from
its weights converted on the fly: the conversion costs far less than the half-precision GEMM.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from moeinfer.kernels.registry import register_kernel

PADDED_WASTE = 1.5  # use the padded bmm schedule when E * C <= PADDED_WASTE * S ...
PADDED_MIN_EXPERTS = 32  # ... and there are many experts (few, large GEMMs gain nothing from bmm)
WIDEN_MIN_ROWS = 2  # widen a half-precision expert's weights to fp32 from this many rows on


@lru_cache(maxsize=None)
def slow_half_matmul(dtype: torch.dtype) -> bool:
    """True when this CPU has no native matmul for `dtype` (bf16 without AVX512-BF16/AMX, fp16 without
    AVX512-FP16): there a bf16 GEMM costs ~40 us per row of a 768x192 weight against ~4 us in fp32."""
    try:
        if dtype == torch.bfloat16:
            return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
        if dtype == torch.float16:
            return not torch.ops.mkldnn._is_mkldnn_fp16_supported()
    except (AttributeError, RuntimeError):
        return dtype in (torch.bfloat16, torch.float16)
    return False


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
        if E >= PADDED_MIN_EXPERTS and min(counts_host) > 0 and E * C <= PADDED_WASTE * present and C > 1:
            starts = torch.cumsum(counts, 0) - counts  # [E]
            expert_of = flat[order]  # [S'] sorted expert ids
            row = torch.arange(present, device=x.device) - starts[expert_of]
            widen = slow_half_matmul(x.dtype)
            batch = x.new_zeros(E, C, x.shape[1], dtype=torch.float32 if widen else x.dtype)
            batch[expert_of, row] = xs.to(batch.dtype)
            gu, dn = (gate_up.float(), down.float()) if widen else (gate_up, down)
            h = _swiglu(torch.bmm(batch, gu.transpose(1, 2)))  # [E, C, I]
            y = torch.bmm(h, dn.transpose(1, 2))[expert_of, row].to(x.dtype)  # [S', D]
        else:
            widen = slow_half_matmul(x.dtype)
            y = torch.empty_like(xs)
            start = 0
            for e, n in enumerate(counts_host):
                if n:
                    seg = slice(start, start + n)
                    xe, gu, dn = xs[seg], gate_up[e], down[e]
                    if widen and n >= WIDEN_MIN_ROWS:  # converting the weights beats a half GEMM
                        xe, gu, dn = xe.float(), gu.float(), dn.float()
                    y[seg] = F.linear(_swiglu(F.linear(xe, gu)), dn)
                    start += n
        y_slots[order] = y
    # 4. Combine: each token's K outputs weighted and summed in fp32 (no scatter-add).
    return (y_slots.view(N, K, -1).float() * weights.float()[..., None]).sum(1).to(x.dtype)
