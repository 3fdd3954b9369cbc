"""Weight quantization, group-wise int8 / int4 / int3 / int2 with packed storage.

Algorithms: "rtn" (round-to-nearest with min-max scales), "hqq" (Badri & Shaji, 2023, "Half-
Quadratic Quantization of Large Machine Learning Models": optimised zero-points, no calibration),
"sym" (ggml's Q8_0/Q4_0 rounding), or "auto": HQQ when the model's routed experts hold at most
HQQ_AUTO_MAX_PARAMS weights, RTN above (HQQ's ~15 passes x ~10 iterations over every weight take
minutes per billion parameters on a CPU; RTN takes seconds, and at 4 bits and group 128 the two
differ little in quality on large matrices). The summary names the algorithm used.
HQQ rather than GPTQ (Frantar et al., 2022) is the error-minimising method here because it needs no
calibration data: GPTQ's Hessian comes from each expert's own inputs, and on a calibration set the
rarely routed experts get few tokens (a poorly conditioned Hessian exactly where pruning and mixed
precision look hardest), whereas HQQ treats every expert alike and composes with any earlier step.

Steps:
1. every MoE layer: its plain experts -> QuantizedExperts, allocated empty and filled a few experts at
   a time (all experts of a block batched in one call; each expert's gate_up [2I, D] and down [D, I]
   quantized per row in groups of `group_size` input columns): memory grows by the packed codes plus
   ~100 MB of temporaries, never by a float copy of the layer; a progress bar over experts with ETA;
2. scope "all": also every other nn.Linear (attention, dense and shared-expert MLPs, the shared-
   expert gate; lm_head when `lm_head` is set and not tied to the embeddings) -> QuantizedLinear;
   routers, embeddings and norms stay in floating point;
3. summary: algorithm, stored bits per expert weight (scales and zeros included), relative weight
   error (measured on up to ERROR_SAMPLE experts per layer, evenly spaced).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeinfer.compress.calibration import CalibrationData
from moeinfer.formats.quant.groupwise import ALGORITHMS, SUPPORTED_BITS
from moeinfer.formats.quant.groupwise import quantize as quantize_tensor
from moeinfer.formats.quant.symmetric import SYMMETRIC_BITS
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.formats.quantized_linear import QuantizedLinear
from moeinfer.compress.registry import register_method
from moeinfer.compress.surgery import plain_experts
from moeinfer.model.transformer import MoEModel

SCOPES = ("experts", "all")
HQQ_AUTO_MAX_PARAMS = 250_000_000  # "auto" runs HQQ up to this many routed-expert weights (~1-3 minutes)
EXPERT_BLOCK_ELEMS = 1 << 24  # weights of one matrix quantized per call (a few experts of a layer)
ERROR_SAMPLE = 8  # experts per layer whose weight error the summary measures


@dataclass(frozen=True)
class QuantizeParams:
    bits: int = 4  # 8, 4, 3 or 2
    group_size: int = 128  # input columns per scale/zero; a last, shorter group takes the remainder
    algorithm: str = "auto"  # "rtn", "hqq", "sym" (Q8_0/Q4_0) or "auto" (HQQ on small models, RTN above)
    scope: str = "experts"  # "experts" (routed experts) or "all" (every linear layer but routers)
    lm_head: bool = False  # with scope "all": quantize lm_head too

    def __post_init__(self) -> None:
        check_quant_fields(self.bits, self.group_size, self.algorithm, auto=True)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.lm_head and self.scope != "all":
            raise ValueError("lm_head=True needs scope 'all'")


def check_quant_fields(bits: Any, group_size: Any, algorithm: Any, *, auto: bool = False) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}; supported: {', '.join(map(str, SUPPORTED_BITS))}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 8:
        raise ValueError(f"group_size must be an integer >= 8, got {group_size!r}")
    allowed = ALGORITHMS + (("auto",) if auto else ())
    if algorithm not in allowed:
        raise ValueError(f"algorithm must be one of {', '.join(allowed)}, got {algorithm!r} "
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


def resolve_algorithm(model: MoEModel, algorithm: str) -> str:
    """"auto" -> "hqq" when the routed experts hold at most HQQ_AUTO_MAX_PARAMS weights, else "rtn"."""
    if algorithm != "auto":
        return algorithm
    n = sum(b.experts.gate_up_proj.numel() + b.experts.down_proj.numel() for b in model.moe_blocks()
            if hasattr(b.experts, "gate_up_proj"))  # the float experts still to quantize
    return "hqq" if n <= HQQ_AUTO_MAX_PARAMS else "rtn"


def _quantize_layer(ex: Any, p: QuantizeParams, algorithm: str, bar: Any) -> tuple[QuantizedExperts, float]:
    """Step 1 for one layer: (QuantizedExperts, mean relative error of the sampled experts)."""
    E, two_i, D = ex.gate_up_proj.shape
    with torch.device(ex.gate_up_proj.device):  # empty storage, filled below
        q = QuantizedExperts([p.bits] * E, D, two_i // 2, p.group_size)
    n = max(1, EXPERT_BLOCK_ELEMS // (two_i * D))
    for start in range(0, E, n):
        for matrix, w in (("gate_up", ex.gate_up_proj), ("down", ex.down_proj)):
            q.set_experts_(matrix, start, quantize_tensor(w.data[start:start + n], bits=p.bits,
                                                          group_size=p.group_size, algorithm=algorithm))
        bar.update(min(n, E - start))
    sample = sorted({round(i * (E - 1) / max(1, ERROR_SAMPLE - 1)) for i in range(min(E, ERROR_SAMPLE))})
    errs = []
    for e in sample:
        gu, dn = q.expert_weights(e, torch.float32)
        errs.append((relative_error(ex.gate_up_proj[e], gu) + relative_error(ex.down_proj[e], dn)) / 2)
    return q, sum(errs) / len(errs)


@register_method("quantize", params=QuantizeParams, needs="none")
def quantize(model: MoEModel, p: QuantizeParams, calib: CalibrationData | None, *,
             progress: bool = True) -> dict[str, Any]:
    """Group-wise int8/4/3/2 quantization of experts or all linear layers (RTN, HQQ or Q8_0/Q4_0), packed."""
    from tqdm.auto import tqdm

    blocks = model.moe_blocks()
    for block in blocks:  # check every layer before changing any
        plain_experts(block, "quantize")
    algorithm = resolve_algorithm(model, p.algorithm)
    errors: list[float] = []
    stored_bits: list[float] = []
    # 1. experts, layer by layer, a few experts at a time
    total = sum(b.experts.num_experts for b in blocks)
    with tqdm(total=total, desc=f"quantize int{p.bits} experts ({algorithm})", unit="expert",
              disable=not progress or None) as bar:
        for block in blocks:
            q, err = _quantize_layer(block.experts, p, algorithm, bar)
            errors.append(err)
            stored_bits.append(q.weight_bits())
            block.experts = q  # the float experts are freed here
    # 2. the other linear layers
    others: list[str] = []
    if p.scope == "all":
        linears = _linears(model, p.lm_head)
        for name, lin in tqdm(linears, desc=f"quantize int{p.bits} linears", unit="linear",
                              disable=not progress or None):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    QuantizedLinear.from_linear(lin, bits=p.bits, group_size=p.group_size, algorithm=algorithm))
            others.append(name)
    # 3. summary
    summary: dict[str, Any] = {"layers": len(blocks), "algorithm": algorithm,
                               "expert_bits_stored": round(sum(stored_bits) / len(stored_bits), 4),
                               "expert_rel_error": round(sum(errors) / len(errors), 6)}
    if p.scope == "all":
        summary["linears"] = len(others)
        if p.lm_head and model.config.tie_word_embeddings:
            summary["lm_head"] = "kept: tied to the embeddings"
    return summary
