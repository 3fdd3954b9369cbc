"""Per-expert mixed-precision quantization under an average-bit budget (MC-MoE, Huang et al., 2024,
"Mixture Compressor for Mixture-of-Experts LLMs Gains More": pre-loading mixed-precision
quantization, bit widths chosen by a linear program over expert importance and quantization loss).

Shapes: N calibration tokens, D hidden, E experts per layer, M experts in the whole model, C bit
widths among the candidates.

Steps:
1. per layer (progress bar): importance of expert e = frequency x mean gate weight on the
   calibration tokens = (tokens routed to e / N) x (mean gate weight of those tokens);
2. quantize every expert at every candidate width and measure its quantization loss: the mean
   squared error of the expert's output on the layer's calibration inputs (up to `max_tokens` of
   them; "weight" error, ||W - Q(W)||^2, when the calibration is a routing trace without inputs);
3. choose the widths of all M experts at once: minimise sum_e importance_e x loss_e(bits_e) subject
   to mean bits <= avg_bits; all experts have the same size, so this integer program is a multiple-
   choice knapsack over whole bits, solved exactly by dynamic programming;
4. store each layer as QuantizedExperts with its experts' widths (the codes measured in 2. are kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moeinfer.compress.calibration import CalibrationData
from moeinfer.compress.methods.quantize import check_quant_fields
from moeinfer.formats.quant.groupwise import QuantizedTensor, quantize
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.compress.registry import CompressionError, register_method
from moeinfer.compress.surgery import plain_experts
from moeinfer.model.mlp import swiglu
from moeinfer.model.transformer import MoEModel

ERRORS = ("auto", "output", "weight")
IMPORTANCE = ("gate", "none")


@dataclass(frozen=True)
class MixedPrecisionParams:
    avg_bits: float = 2.5  # budget: mean code bits per expert weight (scales and zeros not counted)
    candidates: tuple[int, ...] = (2, 3, 4)  # bit widths an expert may get
    group_size: int = 128
    algorithm: str = "hqq"  # one of groupwise.ALGORITHMS: "rtn", "hqq", "sym" (Q8_0/Q4_0)
    error: str = "auto"  # "output" (needs calibration inputs), "weight", or "auto" (output when available)
    max_tokens: int = 512  # calibration tokens per layer used to measure output error
    importance: str = "gate"  # "gate": frequency x mean gate weight (MC-MoE); "none": error alone (ablation)

    def __post_init__(self) -> None:
        cands = tuple(sorted(set(self.candidates))) if isinstance(self.candidates, (list, tuple)) else None
        if not cands:
            raise ValueError(f"candidates must be a non-empty list of bit widths, got {self.candidates!r}")
        for b in cands:
            check_quant_fields(b, self.group_size, self.algorithm)
        object.__setattr__(self, "candidates", cands)
        if not isinstance(self.avg_bits, (int, float)) or not cands[0] <= self.avg_bits <= cands[-1]:
            raise ValueError(f"avg_bits={self.avg_bits!r} is impossible with candidates {list(cands)}: it must lie "
                             f"between {cands[0]} and {cands[-1]}")
        if self.error not in ERRORS:
            raise ValueError(f"error must be one of {', '.join(ERRORS)}, got {self.error!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")


def choose_bits(importance: torch.Tensor, loss: torch.Tensor, candidates: Sequence[int],
                avg_bits: float) -> list[int]:
    """Exact multiple-choice knapsack: importance [M], loss [M, C] -> widths [M] minimising
    sum importance * loss with sum(bits) <= floor(avg_bits * M)."""
    M, C = loss.shape
    cost = (importance[:, None].double() * loss.double())  # [M, C]
    extra = [b - candidates[0] for b in candidates]  # bits above the smallest width
    budget = int(avg_bits * M + 1e-9) - candidates[0] * M  # extra bits to hand out
    inf = float("inf")
    dp = torch.full((budget + 1,), inf, dtype=torch.float64)
    dp[0] = 0.0  # dp[j] = least cost with exactly j extra bits spent so far
    choice = torch.zeros(M, budget + 1, dtype=torch.int8)
    for m in range(M):
        best = torch.full_like(dp, inf)
        arg = torch.zeros(budget + 1, dtype=torch.int8)
        for c, x in enumerate(extra):
            if x > budget:
                continue
            cand = torch.full_like(dp, inf)
            cand[x:] = dp[:budget + 1 - x] + cost[m, c]
            better = cand < best
            best = torch.where(better, cand, best)
            arg = torch.where(better, torch.tensor(c, dtype=torch.int8), arg)
        dp, choice[m] = best, arg
    j = int(torch.argmin(dp))
    out = [0] * M
    for m in range(M - 1, -1, -1):
        c = int(choice[m, j])
        out[m] = candidates[c]
        j -= extra[c]
    return out


@register_method("quantize_mixed", params=MixedPrecisionParams, needs="routing")
def quantize_mixed(model: MoEModel, p: MixedPrecisionParams, calib: CalibrationData, *,
                   progress: bool = True) -> dict[str, Any]:
    """Per-expert bit widths under an average-bit budget from importance and quantization loss (MC-MoE)."""
    from tqdm.auto import tqdm

    blocks = model.moe_blocks()
    for block in blocks:
        plain_experts(block, "quantize_mixed")
    use_output = p.error == "output" or (p.error == "auto" and calib.has_activations)
    if use_output and not calib.has_activations:
        raise CompressionError(f"quantize_mixed with error='output' needs calibration inputs (a text), not the "
                               f"routing trace {calib.source}; use error='weight' or 'auto'")
    importance: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    codes: list[list[list[tuple[QuantizedTensor, QuantizedTensor]]]] = []  # [layer][expert][candidate]
    for block in tqdm(blocks, desc="quantize_mixed: measure", unit="layer", disable=not progress or None):
        ex, lc = block.experts, calib.layer(block)
        # 1. importance = frequency x mean gate weight
        freq, mass = lc.frequency(block), lc.gate_mass(block)
        n_tokens = max(1, int(lc.routing(block).indices.shape[0]))
        imp = (freq / n_tokens) * (mass / freq.clamp_min(1))
        importance.append(imp if p.importance == "gate" else torch.ones_like(imp))
        # 2. quantization loss of every expert at every width
        x = lc.x[: p.max_tokens].float() if use_output else None  # fp32: bf16 matmul is slow on CPUs
        layer_loss = torch.zeros(ex.num_experts, len(p.candidates))
        layer_codes = []
        for e in range(ex.num_experts):
            gu, dn = ex.gate_up_proj.data[e].float(), ex.down_proj.data[e].float()
            ref = swiglu(x, gu, dn) if x is not None else None
            per = []
            for c, b in enumerate(p.candidates):
                qgu = quantize(gu, bits=b, group_size=p.group_size, algorithm=p.algorithm)
                qdn = quantize(dn, bits=b, group_size=p.group_size, algorithm=p.algorithm)
                wgu, wdn = qgu.dequantize(), qdn.dequantize()
                if ref is not None:
                    layer_loss[e, c] = (swiglu(x, wgu, wdn) - ref).float().pow(2).sum(-1).mean()
                else:
                    layer_loss[e, c] = (wgu - gu).float().pow(2).sum() + (wdn - dn).float().pow(2).sum()
                per.append((qgu, qdn))
            layer_codes.append(per)
        losses.append(layer_loss)
        codes.append(layer_codes)
    # 3. one budget for the whole model
    flat = choose_bits(torch.cat(importance), torch.cat(losses), p.candidates, p.avg_bits)
    # 4. store
    chosen: dict[str, list[int]] = {}
    start = 0
    for block, layer_codes in zip(blocks, codes):
        E = block.experts.num_experts
        bits = flat[start:start + E]
        start += E
        picked = [layer_codes[e][p.candidates.index(b)] for e, b in enumerate(bits)]
        ex = block.experts
        block.experts = QuantizedExperts.from_quantized(picked, ex.gate_up_proj.shape[2], ex.down_proj.shape[2],
                                                        p.group_size, dtype=ex.gate_up_proj.dtype)
        chosen[str(block.layer_idx)] = bits
    stored = [b.experts.weight_bits() for b in blocks]
    return {"avg_bits": round(sum(flat) / len(flat), 4), "error": "output" if use_output else "weight",
            "bits": chosen, "expert_bits_stored": round(sum(stored) / len(stored), 4)}
