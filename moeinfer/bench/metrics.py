"""Resource and MoE-aware metrics: sparsity-aware utilisation (S-MBU, S-MFU), memory, expert load.

Shapes: B rows of a forward, T new tokens per row, N = B*T tokens, S = end of the attended key
slots, L layers, E experts, K top-k, d_l distinct experts activated at MoE layer l in the forward.

S-MBU and S-MFU follow MoE-CAP (Jiang et al., 2024): count only the experts a forward actually
activated. For one forward f (formulas also in docs/benchmark.md):

    bytes_f = W_dense + min(N, V) * D * b  +  sum_l d_l * W_expert  +  B * S * kv_slot
    flops_f = 2 N P_dense  +  sum_l 2 (N K_l) P_expert  +  B T S * attn_flops_per_key

W_dense: bytes of every weight but the routed experts and the embedding table (attention, routers,
shared experts, dense FFNs, norms, lm_head); the embedding contributes the N rows it reads (b bytes
per element). W_expert, P_expert: bytes and parameters of one routed expert. P_dense: matmul
parameters each token goes through (attention projections, router, shared/dense FFN, lm_head).
kv_slot: KV-cache bytes of one token over all layers (read for the S slots every row attends to).
attn_flops_per_key = 4 H Dh per attention layer (QK^T and AV). Activations are not counted.

    S-MBU = sum_f bytes_f / sum_f t_f / peak bandwidth      S-MFU = sum_f flops_f / sum_f t_f / peak FLOP/s

Decode forwards (T = 1) and prefill forwards (T > 1) are summed separately: S-MBU is the
decode-phase figure of merit (memory-bound), S-MFU the prefill-phase one (compute-bound).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeinfer.model.shape import ModelShape
from moeinfer.model.summary import summarize


@dataclass(frozen=True)
class ForwardRecord:
    """One timed forward: rows, new tokens per row, attended slots, per-MoE-layer expert use."""

    seconds: float
    rows: int
    tokens: int  # T, new tokens per row
    kv_end: int  # S
    distinct: tuple[int, ...]  # d_l per MoE layer
    slots: tuple[int, ...]  # N * K_l per MoE layer

    @property
    def phase(self) -> str:
        return "prefill" if self.tokens > 1 else "decode"

    def to_list(self) -> list[Any]:
        return [round(self.seconds, 7), self.rows, self.tokens, self.kv_end, list(self.distinct), list(self.slots)]

    @classmethod
    def from_list(cls, x: Sequence[Any]) -> ForwardRecord:
        return cls(float(x[0]), int(x[1]), int(x[2]), int(x[3]), tuple(x[4]), tuple(x[5]))


def forward_cost(f: ForwardRecord, m: ModelShape) -> tuple[int, int]:
    """(bytes moved, FLOPs) of one forward, by the formulas of the module docstring."""
    n = f.rows * f.tokens
    nbytes = (m.dense_read_bytes + min(n, m.vocab_size) * m.embed_row_bytes + sum(f.distinct) * m.expert_bytes
              + f.rows * f.kv_end * m.kv_slot_bytes)
    flops = (2 * n * m.dense_matmul_params + sum(2 * s * m.expert_params for s in f.slots)
             + n * f.kv_end * m.attn_flops_per_key)
    return nbytes, flops


def compute_peak(flops: dict[str, float], dtype: str) -> float | None:
    """The matmul peak a model of `dtype` is measured against: the fastest of its own dtype and fp32.

    Kernels may compute a half-precision model in fp32 (the CPU kernels widen bf16 on CPUs without
    native bf16 matmul), so the bf16 peak alone understates what the machine can do and gave S-MFU
    above 100%; the larger of the two is the machine's real limit for this work."""
    rates = [flops[d] for d in (dtype, "float32") if flops.get(d)]
    return max(rates) if rates else None


def sparse_utilization(forwards: Sequence[ForwardRecord], m: ModelShape, *, bandwidth: float | None,
                       flops_peak: float | None) -> dict[str, dict[str, float | None]]:
    """Per phase: seconds, bytes, FLOPs, achieved GB/s and TFLOP/s, S-MBU and S-MFU against the peaks."""
    out: dict[str, dict[str, float | None]] = {}
    for phase in ("prefill", "decode"):
        fs = [f for f in forwards if f.phase == phase]
        t = sum(f.seconds for f in fs)
        costs = [forward_cost(f, m) for f in fs]
        nbytes, flops = sum(c[0] for c in costs), sum(c[1] for c in costs)
        bw = nbytes / t if t > 0 else None
        fl = flops / t if t > 0 else None
        out[phase] = dict(forwards=len(fs), seconds=t, bytes=nbytes, flops=flops, bytes_per_s=bw, flops_per_s=fl,
                          s_mbu=bw / bandwidth if bw is not None and bandwidth else None,
                          s_mfu=fl / flops_peak if fl is not None and flops_peak else None)
    return out


def expert_load(forwards: Sequence[ForwardRecord], counts: np.ndarray | None) -> dict[str, Any]:
    """Distinct experts per MoE layer per decode step (mean over steps, per layer and overall) and the
    load imbalance max_e c[l,e] / mean_e c[l,e] of the tokens per expert (as moeinfer.traces.stats)."""
    dec = [f.distinct for f in forwards if f.phase == "decode" and f.distinct]
    per_layer = np.asarray(dec, dtype=float).mean(0).tolist() if dec else []
    out: dict[str, Any] = dict(distinct_per_layer_decode=per_layer,
                               distinct_mean_decode=float(np.mean(per_layer)) if per_layer else None)
    if counts is not None and counts.size:
        mean = counts.mean(1)
        imb = np.where(mean > 0, counts.max(1) / np.where(mean > 0, mean, 1), np.nan)
        out.update(imbalance_per_layer=imb.tolist(), imbalance_mean=float(np.nanmean(imb)),
                   imbalance_max=float(np.nanmax(imb)), tokens_per_expert=counts.tolist())
    else:
        out.update(imbalance_per_layer=[], imbalance_mean=None, imbalance_max=None, tokens_per_expert=[])
    return out


def weight_stats(model: Any) -> dict[str, Any]:
    """Weight bytes, parameters and effective bits per parameter (8 * bytes / parameters)."""
    s = summarize(model)
    nbytes = sum(s["bytes"].values())
    return dict(weight_bytes=nbytes, params_total=s["params_total"], params_active=s["params_active"],
                bits_per_param=8 * nbytes / s["params_total"], bytes_by_component=s["bytes"])


def kv_cache_bytes(shape: ModelShape, rows: int, length: int) -> int:
    """Bytes of a preallocated cache of `rows` x `length` slots."""
    return rows * length * shape.kv_slot_bytes


# -- memory ---------------------------------------------------------------------------------------

def peak_rss_bytes(status: str | Path = "/proc/self/status") -> int | None:
    """The process's peak resident set size (VmHWM), or None where /proc is not there."""
    try:
        for line in Path(status).read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def reset_gpu_peak(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_bytes(device: Any) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None


def as_dict(x: Any) -> dict[str, Any]:
    return asdict(x)
