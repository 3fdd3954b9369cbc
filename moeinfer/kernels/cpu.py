"""The `cpu` kernel: grouped expert compute for CPUs, in the spirit of MegaBlocks' "sort tokens by
expert, then one GEMM per group" (Gale et al., 2023) without a Python loop over idle experts.

Shapes: N tokens, D hidden, E local experts, K top-k, I inner size, S = N*K slots (S' present).

Steps:
1. Map and sort the S slots by expert (absent experts last, dropped); count slots per expert.
2. Expert compute on the sorted rows, one of three schedules (`SCHEDULES`; `choose_schedule` picks
   one from the CPU and the shapes, `cpu_moe(..., schedule=...)` forces one, so tests run every
   schedule on any CPU):
   - "grouped": `torch._grouped_mm` over all experts at once (group ends = cumulative counts),
     one call per projection, no Python loop; used for fp32 when `_grouped_mm` accepts the shapes
     (its weight strides must be multiples of 16 bytes, so bf16 needs D and I multiples of 8: probed
     per shape, never assumed);
   - "per-expert": one GEMM pair per expert that received slots (counts read once, free on a CPU);
     used for bf16/fp16 on CPUs with a native half matmul (faster there than "grouped", measured);
   - "widened": per expert, with the active experts' half-precision weights widened to fp32 from
     WIDEN_MIN_ROWS rows on; used for fp16 on CPUs without native half matmul (below);
   - "rows": one native call (csrc/moe_rows.cpp) that reads each routed expert's bf16/fp32 weight
     rows once, widened in registers, against all of its token rows; used for bf16 on CPUs without
     native bf16 matmul when the native library is built (widening whole experts for a GEMM moves
     ~5x the weight bytes). Where it cannot run (fp16, engine 'torch', no library) it is "widened".
3. SiLU(gate) * up, down projection, multiply by the routing weight.
4. Combine: put the outputs back in slot order and sum each token's K weighted rows
   (a scatter-add over threads was slow here).
Batch-1 decode skips sorting: with the native library (moeinfer.kernels.native) all K experts of the
token run in one call (gate_up, SiLU * up, down and the weighted sum, bf16 widened in registers,
fp32 accumulation); otherwise K matvecs on views. `engine=` forces one (moeinfer.kernels.cpu_native).
Matmuls run on torch's intra-op pool, so all cores are used (`torch.set_num_threads`).
On CPUs without native bf16/fp16 matmul (AVX2) a half-precision GEMM is slow: bf16 experts run
"rows" (weights widened in registers), fp16 ones (or bf16 without the native library) "widened".
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from moeinfer.kernels import native
from moeinfer.kernels.cpu_native import choose_engine, moe_decode, moe_rows, native_weights
from moeinfer.kernels.registry import register_kernel
from moeinfer.model.mlp import silu_and_mul

WIDEN_MIN_ROWS = 2  # widen a half-precision expert's weights to fp32 from this many rows on
# "per-expert" in half precision pads each expert's rows to a multiple of this many (zero rows, cut off
# after): oneDNN's bf16 GEMMs on AMX, whose tiles hold 16 rows, ran the OLMoE-shaped model's cold
# 128/512-token prefills at 236-243 / 354-373 tok/s padded against 133-167 / 231-241 unpadded (warm:
# 305 / 412-541 against 294-302 / 280-287; 2 threads, Intel Xeon; docs/benchmarks.md), for experts whose
# gate_up holds at least PAD_MIN_WEIGHTS weights (the shipped model's 768 x 192 ran 6% slower padded)
PAD_ROWS = 16
PAD_MIN_WEIGHTS = 1 << 20


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


SCHEDULES = ("grouped", "per-expert", "widened", "rows")
# fp32 bytes of the combine's temporary per chunk of token rows: one [N, K, D] fp32 copy at a 512-token
# prefill of OLMoE-1B-7B is 32 MiB, a fresh mmap whose page faults made the combine ~10x slower than in
# cache-sized chunks (21 -> 2.2 ms a layer, 2 threads, Intel Xeon; the same bits)
COMBINE_BYTES = 1 << 20


@lru_cache(maxsize=None)
def grouped_mm_works(dtype: torch.dtype, hidden: int = 8, inner: int = 8) -> bool:
    """torch._grouped_mm runs on the CPU for `dtype` with both projections of experts of hidden size
    `hidden` and inner size `inner`, laid out as the kernel passes them (transposed stacked weights).

    Probed with those exact sizes (torch >= 2.9 has a CPU implementation; some of its paths refuse
    strides that are not multiples of 16 bytes), so an unsupported shape falls back, never raises."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        offs = torch.tensor([1, 3], dtype=torch.int32)
        for d_in, d_out in ((hidden, 2 * inner), (inner, hidden)):
            a = torch.ones(3, d_in, dtype=dtype)
            b = torch.ones(2, d_out, d_in, dtype=dtype).transpose(1, 2)
            if not bool((torch._grouped_mm(a, b, offs=offs) == d_in).all()):
                return False
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def rows_schedule(dtype: torch.dtype) -> bool:
    """`choose_schedule` picks the native rows kernel for experts of `dtype` on this CPU (bf16 without a
    native bf16 matmul, the native library built): decided without probing any shape."""
    return dtype == torch.bfloat16 and slow_half_matmul(dtype) and native.best_variant() is not None


def choose_schedule(dtype: torch.dtype, hidden: int, inner: int) -> str:
    """The fastest schedule that this CPU runs correctly for experts of this dtype and shape."""
    if rows_schedule(dtype):
        return "rows"
    if slow_half_matmul(dtype):
        return "widened"
    if dtype != torch.float32:
        # a native half matmul (AVX512-BF16/AMX): torch's F.linear per expert took 128- and 512-token bf16
        # prefills of the OLMoE-shaped model at 232-236 / 329 tok/s from a fresh process where
        # _grouped_mm (one mm per group on transposed weight views) took 162-210 / 243-313 (2 threads,
        # Intel Xeon with AMX, docs/kernels.md)
        return "per-expert"
    return "grouped" if grouped_mm_works(dtype, hidden, inner) else "per-expert"


def _one_token(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    """Batch-1 decode: K matrix-vector pairs on views of the chosen experts, no sorting, no copies."""
    experts = indices[0].tolist()
    if expert_map is not None:
        experts = [int(expert_map[e]) for e in experts]
    ys = [F.linear(silu_and_mul(F.linear(x, gate_up[e])), down[e]) if e >= 0 else x.new_zeros(x.shape)
          for e in experts]  # K x [1, D]
    return torch.mm(weights.to(x.dtype), torch.cat(ys))  # [1, K] @ [K, D]


def _expert_rows(xe: torch.Tensor, gu: torch.Tensor, dn: torch.Tensor, schedule: str) -> torch.Tensor:
    """Steps 2-3 for one expert's n rows xe [n, D] on the "per-expert" or "widened" schedule."""
    n, dtype = xe.shape[0], xe.dtype
    if schedule == "widened" and xe.dtype != torch.float32 and n >= WIDEN_MIN_ROWS:
        xe, gu, dn = xe.float(), gu.float(), dn.float()  # converting the weights beats a half GEMM
    # half precision on big experts: rows padded to PAD_ROWS (measured for native half matmuls, the CPUs
    # choose_schedule gives this schedule in half precision; harmless where it is forced)
    if (schedule == "per-expert" and xe.dtype != torch.float32 and gu.numel() >= PAD_MIN_WEIGHTS
            and n > 1 and n % PAD_ROWS):
        xe = torch.cat([xe, xe.new_zeros(PAD_ROWS - n % PAD_ROWS, xe.shape[1])])
    return F.linear(silu_and_mul(F.linear(xe, gu)), dn)[:n].to(dtype)


def one_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, *, schedule: str | None = None,
               engine: str | None = None) -> torch.Tensor:
    """SwiGLU of one expert's rows x [n, D] with gate_up [2I, D], down [D, I]: the same bits as
    `cpu_moe` routing every row to this one expert at weight 1, without its sort and combine (an
    offload cache runs its experts one call each: on the shipped model those steps cost ~0.2 ms a
    call, more than the expert's GEMMs)."""
    n = x.shape[0]
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"unknown cpu schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if schedule is None and n > 1:
        schedule = choose_schedule(x.dtype, gate_up.shape[1], down.shape[1])
    if schedule == "grouped" and not grouped_mm_works(x.dtype, gate_up.shape[1], down.shape[1]):
        schedule = "per-expert"
    if n == 1 or schedule in ("rows", "grouped"):  # one native call / one grouped GEMM: cpu_moe's own path
        return cpu_moe(x, x.new_zeros(n, 1, dtype=torch.long), x.new_ones(n, 1), gate_up[None], down[None],
                       schedule=schedule, engine=engine)
    return _expert_rows(x, gate_up, down, schedule)


def _not_cpu(device: torch.device) -> str | None:
    return None if device.type == "cpu" else f"it runs on CPU tensors (got {device.type}); use 'triton' or 'auto'"


@register_kernel("cpu", why_unavailable=_not_cpu)
def cpu_moe(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
            gate_up: torch.Tensor, down: torch.Tensor, *,
            expert_map: torch.Tensor | None = None, schedule: str | None = None,
            engine: str | None = None) -> torch.Tensor:
    """Sorted slots, one grouped GEMM per projection (or a GEMM pair per active expert), weighted sum.

    `schedule` forces one of SCHEDULES (default: `choose_schedule`); batch-1 decode has its own path,
    whose engine ('torch' or a native variant, moeinfer.kernels.cpu_native.ENGINES) `engine` forces."""
    N, K = indices.shape
    E = gate_up.shape[0]
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"unknown cpu schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if N == 1:  # batch-1 decode, whatever the schedule
        engine = choose_engine(engine)
        if engine != "torch" and native_weights(gate_up, down):
            return moe_decode(x, indices, weights, gate_up, down, expert_map=expert_map, engine=engine)
        return _one_token(x, indices, weights, gate_up, down, expert_map)
    if schedule is None:
        schedule = choose_schedule(x.dtype, gate_up.shape[2], down.shape[2])
    if schedule == "grouped" and not grouped_mm_works(x.dtype, gate_up.shape[2], down.shape[2]):
        schedule = "per-expert"  # torch refuses these shapes here: same result, one GEMM pair per expert
    if schedule == "rows":
        engine = choose_engine(engine)
        if engine != "torch" and native_weights(gate_up, down):
            return moe_rows(x, indices, weights, gate_up, down, expert_map=expert_map, engine=engine)
        schedule = "widened"  # the native rows cannot run these weights or this engine: same result
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
        # 2-3. Expert compute on one of two schedules.
        if schedule == "grouped":
            offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] end row of each expert's group
            h = silu_and_mul(torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs))  # [S', I]
            y = torch._grouped_mm(h, down.transpose(1, 2), offs=offs)  # [S', D]
        else:
            y = torch.empty_like(xs)
            start = 0
            for e, n in enumerate(counts_host):
                if n:
                    seg = slice(start, start + n)
                    y[seg] = _expert_rows(xs[seg], gate_up[e], down[e], schedule)
                    start += n
        y_slots[order] = y
    # 4. Combine: each token's K outputs weighted and summed in fp32 (no scatter-add).
    return combine(y_slots.view(N, K, -1), weights, x.dtype)


def combine(y: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out[n] = sum_k weights[n, k] * y[n, k] in fp32, rounded to `dtype` once: y [N, K, D], weights [N, K].
    In chunks of token rows whose fp32 temporary is about COMBINE_BYTES; each row's sum is the same
    operations in the same order whatever the chunking, so the same bits as one whole-batch product."""
    N, K, D = y.shape
    rows = max(1, COMBINE_BYTES // (4 * K * D))
    if rows >= N:
        return (y.float() * weights.float()[..., None]).sum(1).to(dtype)
    out = y.new_empty(N, D, dtype=dtype)
    w = weights.float()[..., None]
    for s in range(0, N, rows):
        out[s:s + rows] = (y[s:s + rows].float() * w[s:s + rows]).sum(1)
    return out
