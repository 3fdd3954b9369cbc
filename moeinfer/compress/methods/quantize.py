"""Weight quantization, group-wise int8 / int4 / int3 / int2 with packed storage.

Algorithms: "rtn" (round-to-nearest with min-max scales) or "hqq" (Badri & Shaji, 2023, "Half-
Quadratic Quantization of Large Machine Learning Models": optimised zero-points, no calibration).
HQQ rather than GPTQ (Frantar et al., 2022) is the error-minimising method here because it needs no
calibration data: GPTQ's Hessian comes from each expert's own inputs, and on a calibration set the
rarely routed experts get few tokens (a poorly conditioned Hessian exactly where pruning and mixed
precision look hardest), whereas HQQ treats every expert alike, composes with any earlier step and
runs in seconds on a CPU.

Steps:
1. every MoE layer (progress bar): its plain experts -> QuantizedExperts, each expert's gate_up
   [2I, D] and down [D, I] quantized per row in groups of `group_size` input columns;
2. scope "all": also every other nn.Linear (attention, dense and shared-expert MLPs, the shared-
   expert gate; lm_head when `lm_head` is set and not tied to the embeddings) -> QuantizedLinear;
   routers, embeddings and norms stay in floating point;
3. summary: bits, stored bits per expert weight (scales and zeros included), relative weight error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeinfer.compress.calibration import CalibrationData
from moeinfer.formats.quant.groupwise import ALGORITHMS, SUPPORTED_BITS
from moeinfer.formats.quant.symmetric import SYMMETRIC_BITS
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.formats.quantized_linear import QuantizedLinear
from moeinfer.compress.registry import register_method
from moeinfer.compress.surgery import plain_experts
from moeinfer.model.transformer import MoEModel

SCOPES = ("experts", "all")


@dataclass(frozen=True)
class QuantizeParams:
    bits: int = 4  # 8, 4, 3 or 2
    group_size: int = 128  # input columns per scale/zero; a last, shorter group takes the remainder
    algorithm: str = "hqq"  # one of groupwise.ALGORITHMS: "rtn", "hqq", "sym" (Q8_0/Q4_0)
    scope: str = "experts"  # "experts" (routed experts) or "all" (every linear layer but routers)
    lm_head: bool = False  # with scope "all": quantize lm_head too

    def __post_init__(self) -> None:
        check_quant_fields(self.bits, self.group_size, self.algorithm)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.lm_head and self.scope != "all":
            raise ValueError("lm_head=True needs scope 'all'")


def check_quant_fields(bits: Any, group_size: Any, algorithm: Any) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}; supported: {', '.join(map(str, SUPPORTED_BITS))}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 8:
        raise ValueError(f"group_size must be an integer >= 8, got {group_size!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r} "
                         "(GPTQ is not implemented; HQQ is the error-minimising method)")
    if algorithm == "sym" and bits not in SYMMETRIC_BITS:
        raise ValueError(f"algorithm 'sym' (ggml's Q8_0/Q4_0) supports bits {SYMMETRIC_BITS}, got {bits!r}")


def relative_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref.float() - got.float()).pow(2).sum() / ref.float().pow(2).sum().clamp_min(1e-30))


def _linears(model: MoEModel, lm_head: bool) -> list[tuple[str, nn.Linear]]:
    out = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        if name == "lm_head" and (not lm_head or model.config.tie_word_embeddings):
            continue
        out.append((name, m))
    return out


@register_method("quantize", params=QuantizeParams, needs="none")
def quantize(model: MoEModel, p: QuantizeParams, calib: CalibrationData | None, *,
             progress: bool = True) -> dict[str, Any]:
    """Group-wise int8/4/3/2 quantization of experts or all linear layers (RTN or HQQ), packed."""
    from tqdm.auto import tqdm

    blocks = model.moe_blocks()
    for block in blocks:  # check every layer before changing any
        plain_experts(block, "quantize")
    errors: list[float] = []
    stored_bits: list[float] = []
    # 1. experts, layer by layer
    for block in tqdm(blocks, desc=f"quantize int{p.bits} experts", unit="layer", disable=not progress or None):
        ex = block.experts
        q = QuantizedExperts.from_float(ex.gate_up_proj.data, ex.down_proj.data, [p.bits] * ex.num_experts,
                                        group_size=p.group_size, algorithm=p.algorithm)
        gu, dn = q.dequantize_all(torch.float32)
        errors.append((relative_error(ex.gate_up_proj, gu) + relative_error(ex.down_proj, dn)) / 2)
        stored_bits.append(q.weight_bits())
        block.experts = q
    # 2. the other linear layers
    others: list[str] = []
    if p.scope == "all":
        linears = _linears(model, p.lm_head)
        for name, lin in tqdm(linears, desc=f"quantize int{p.bits} linears", unit="linear",
                              disable=not progress or None):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    QuantizedLinear.from_linear(lin, bits=p.bits, group_size=p.group_size, algorithm=p.algorithm))
            others.append(name)
    # 3. summary
    summary: dict[str, Any] = {"layers": len(blocks), "expert_bits_stored": round(sum(stored_bits) / len(stored_bits), 4),
                               "expert_rel_error": round(sum(errors) / len(errors), 6)}
    if p.scope == "all":
        summary["linears"] = len(others)
        if p.lm_head and model.config.tie_word_embeddings:
            summary["lm_head"] = "kept: tied to the embeddings"
    return summary
