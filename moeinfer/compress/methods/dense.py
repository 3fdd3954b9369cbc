"""Sparse to dense: merge all experts of a layer into one FFN (OneS, Xue et al., 2022, "One Student
Knows All Experts Know: From Sparse to Dense"), without its distillation: the extreme baseline.

The result has one expert per layer routed top-1 with weight 1 (x the model's scaling), so every
token runs the same FFN; `transformers` loads the result. DeepSeek-V3 cannot take it (its router
scores expert groups by their two best experts): a clear error.

Shapes: N calibration tokens, E experts, I expert inner size.

Steps:
1. usage f [E]: tokens routed to each expert on the calibration data (text or routing trace);
2. the dense FFN's weights = sum_e f_e W_e / sum_e f_e (`weighting="uniform"`: the plain mean);
3. its output is scaled by the mean total gate weight a token used to receive (1 for renormalised
   top-k, less for raw softmax probabilities), over the weight the one-expert router now gives;
4. the layer becomes one expert, top-1 (router row zero; DeepSeek's correction bias zero).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from moeinfer.compress.calibration import CalibrationData
from moeinfer.compress.expert_stats import check_unmerged
from moeinfer.formats.layout import replace_experts_
from moeinfer.compress.registry import CompressionError, register_method
from moeinfer.compress.surgery import plain_experts
from moeinfer.model.moe import Experts, MoEBlock, route
from moeinfer.model.transformer import MoEModel


@dataclass(frozen=True)
class DenseParams:
    weighting: str = "frequency"  # "frequency" (usage-weighted, OneS) or "uniform"

    def __post_init__(self) -> None:
        if self.weighting not in ("frequency", "uniform"):
            raise ValueError(f"weighting must be 'frequency' or 'uniform', got {self.weighting!r}")


def densify_(block: MoEBlock, freq: torch.Tensor, gate_per_token: float) -> None:
    """Steps 2-4 for one layer: freq [E] usage weights, gate_per_token the old mean gate weight sum."""
    ex = plain_experts(block, "dense")
    w = freq.double() / freq.sum() if freq.sum() > 0 else torch.full((ex.num_experts,), 1 / ex.num_experts).double()
    new = Experts(1, ex.gate_up_proj.shape[2], ex.down_proj.shape[2]).to(ex.gate_up_proj)
    new.requires_grad_(False)
    new.gate_up_proj.data[0] = torch.einsum("e,eij->ij", w, ex.gate_up_proj.data.double()).to(new.gate_up_proj)
    down = torch.einsum("e,eij->ij", w, ex.down_proj.data.double())  # 2. usage-weighted average
    g = block.gate
    g.cfg = dataclasses.replace(g.cfg, top_k=1)
    g.top_k, g.mode = None, None
    router = torch.zeros(1, g.weight.shape[1], dtype=g.weight.dtype, device=g.weight.device)
    one_cfg = dataclasses.replace(g.cfg, num_experts=1, n_group=1, topk_group=1)
    bias = None if g.e_score_correction_bias is None else torch.zeros(1)
    new_weight = float(route(torch.zeros(1, router.shape[1]), router.float(), one_cfg, bias).weights[0, 0])
    new.down_proj.data[0] = (down * (gate_per_token / new_weight)).to(new.down_proj)  # 3. keep the scale
    replace_experts_(block, new, router, bias)  # 4. one expert, top-1


@register_method("dense", params=DenseParams, needs="routing")
def dense(model: MoEModel, p: DenseParams, calib: CalibrationData, *, progress: bool = True) -> dict[str, Any]:
    """Merge all experts of every layer into one dense FFN by usage-weighted averaging (OneS-style)."""
    from tqdm.auto import tqdm

    scales: dict[str, float] = {}
    for block in tqdm(model.moe_blocks(), desc="dense", unit="layer", disable=not progress or None):
        check_unmerged(block, "dense")
        plain_experts(block, "dense")
        if block.gate.cfg.group_score == "top2_sum":
            raise CompressionError("dense: DeepSeek-V3 routing scores expert groups by their two best experts, so "
                                   "a layer of one expert cannot be written as a loadable config")
        lc = calib.layer(block)
        r = lc.routing(block)  # 1. usage
        freq = lc.frequency(block) if p.weighting == "frequency" else torch.ones(block.gate.weight.shape[0])
        per_token = float(r.weights.float().sum(-1).mean()) if r.weights.numel() else 1.0
        densify_(block, freq, per_token)
        scales[str(block.layer_idx)] = round(per_token, 6)
    model.config.hf_config.pop("moeinfer_routing", None)  # no dynamic gating over one expert
    for key in ("num_experts_per_tok",):
        if key in model.config.hf_config:
            model.config.hf_config[key] = 1
    return {"gate_weight_per_token": scales}
