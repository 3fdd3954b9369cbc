"""Low-rank decomposition of experts: truncated SVD of every expert matrix, with ranks allocated
across the experts of a layer by importance under a parameter budget (MoE-I², Yang et al., 2024,
"MoE-I²: Compressing Mixture of Experts Models through Inter-Expert Pruning and Intra-Expert
Low-Rank Decomposition": its intra-expert stage, with expert-level rank allocation).

Shapes: E experts, D hidden, I expert inner size; per matrix W [m, n] = U diag(s) V^T.

Steps:
1. per layer (progress bar): importance of each expert = frequency x mean gate weight on the
   calibration tokens, normalised to mean 1 (raised to `importance_power`; 0 ignores it);
2. SVD of each expert's gate_up [2I, D] and down [D, I];
3. allocate ranks: every matrix starts at rank 1; each further rank of a matrix gains importance_e x
   s_r^2 (the squared Frobenius error it removes) and costs m + n parameters; ranks are added in order
   of gain per parameter until the layer's budget, `keep` x its dense expert parameters, is spent
   (singular values fall, so this greedy order takes each matrix's ranks in sequence);
4. replace the layer's experts by LowRankExperts with factors a = U_r diag(s_r), b = V_r^T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeinfer.compress.calibration import CalibrationData
from moeinfer.formats.lowrank_experts import LowRankExperts
from moeinfer.compress.registry import CompressionError, register_method
from moeinfer.compress.surgery import plain_experts
from moeinfer.model.transformer import MoEModel


@dataclass(frozen=True)
class LowRankParams:
    keep: float = 0.5  # fraction of each layer's expert parameters kept (0 < keep <= 1)
    importance_power: float = 1.0  # 0: rank by singular values alone; 1: MoE-I²-style importance weighting

    def __post_init__(self) -> None:
        if not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ValueError(f"keep must be a fraction of the expert parameters in (0, 1], got {self.keep!r}")
        if not 0 <= self.importance_power <= 4:
            raise ValueError(f"importance_power must be in [0, 4], got {self.importance_power}")


def allocate_ranks(sv_gu: list[torch.Tensor], sv_dn: list[torch.Tensor], importance: torch.Tensor,
                   cost_gu: int, cost_dn: int, budget: int) -> tuple[list[int], list[int]]:
    """Greedy rank allocation (step 3): singular values per expert and matrix -> ranks (>= 1)."""
    E = len(sv_gu)
    ranks = [[1] * E, [1] * E]
    spent = E * (cost_gu + cost_dn)
    gains, owners = [], []
    for which, (svs, cost) in enumerate(((sv_gu, cost_gu), (sv_dn, cost_dn))):
        for e, s in enumerate(svs):
            g = importance[e] * s[1:].double().pow(2) / cost
            gains.append(g)
            owners.append(torch.tensor([[which, e]]).expand(len(g), 2))
    gain = torch.cat(gains)
    owner = torch.cat(owners)
    for i in torch.argsort(gain, descending=True, stable=True).tolist():
        which, e = owner[i].tolist()
        cost = cost_gu if which == 0 else cost_dn
        if spent + cost <= budget:
            ranks[which][e] += 1
            spent += cost
    return ranks[0], ranks[1]


@register_method("lowrank", params=LowRankParams, needs="routing")
def lowrank(model: MoEModel, p: LowRankParams, calib: CalibrationData, *, progress: bool = True) -> dict[str, Any]:
    """Truncated SVD of expert matrices, ranks allocated by importance under a parameter budget (MoE-I²)."""
    from tqdm.auto import tqdm

    blocks = model.moe_blocks()
    for block in blocks:
        ex = plain_experts(block, "lowrank")
        E, two_i, D = ex.gate_up_proj.shape
        I = two_i // 2
        floor = E * ((two_i + D) + (D + I))
        if p.keep * E * 3 * I * D < floor:
            raise CompressionError(f"lowrank: keep={p.keep} leaves layer {block.layer_idx} {int(p.keep * E * 3 * I * D)} "
                                   f"parameters, fewer than rank 1 for every expert needs ({floor}); "
                                   f"raise keep to at least {floor / (E * 3 * I * D):.4f}")
    ranks_out: dict[str, dict[str, list[int]]] = {}
    kept_params = dense_params = 0
    energy: list[float] = []
    for block in tqdm(blocks, desc="lowrank", unit="layer", disable=not progress or None):
        ex = block.experts
        E, two_i, D = ex.gate_up_proj.shape
        I = two_i // 2
        # 1. importance
        lc = calib.layer(block)
        freq, mass = lc.frequency(block), lc.gate_mass(block)
        imp = (freq / freq.sum().clamp_min(1)) * (mass / freq.clamp_min(1))
        imp = (imp / imp.mean().clamp_min(1e-12)).double().pow(p.importance_power)
        # 2. SVD, in fp32 at least
        svds = [(torch.linalg.svd(ex.gate_up_proj.data[e].float(), full_matrices=False),
                 torch.linalg.svd(ex.down_proj.data[e].float(), full_matrices=False)) for e in range(E)]
        # 3. ranks under the budget
        budget = int(p.keep * E * 3 * I * D)
        r_gu, r_dn = allocate_ranks([s[0].S for s in svds], [s[1].S for s in svds], imp, two_i + D, D + I, budget)
        # 4. factors
        dtype = ex.gate_up_proj.dtype
        factors = []
        total = kept = 0.0
        for e, ((U1, S1, V1), (U2, S2, V2)) in enumerate(svds):
            a, b = r_gu[e], r_dn[e]
            factors.append(((U1[:, :a] * S1[:a]).to(dtype), V1[:a].to(dtype), (U2[:, :b] * S2[:b]).to(dtype),
                            V2[:b].to(dtype)))
            total += float(S1.pow(2).sum() + S2.pow(2).sum())
            kept += float(S1[:a].pow(2).sum() + S2[:b].pow(2).sum())
        block.experts = LowRankExperts.from_svd(factors, D, I).to(ex.gate_up_proj.device)
        energy.append(kept / max(total, 1e-30))
        kept_params += sum(r_gu) * (two_i + D) + sum(r_dn) * (D + I)
        dense_params += E * 3 * I * D
        ranks_out[str(block.layer_idx)] = {"gate_up": r_gu, "down": r_dn}
    return {"params_kept": round(kept_params / dense_params, 4), "energy_kept": round(sum(energy) / len(energy), 4),
            "ranks": ranks_out}
