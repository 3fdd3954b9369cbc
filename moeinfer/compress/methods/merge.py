"""Expert merging: cluster each layer's experts and merge every cluster into one expert (MC-SMoE,
Li et al., 2024, "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy";
HC-SMoE, Chen et al., 2024, "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering").

Routing to merged experts adds their gate weights. With `router="map"` (default) that is exact: the
router keeps all its rows and chooses among the original experts as before; a map sends each
original expert to its merged one, so a token that picks two experts of one cluster gets the merged
expert with the sum of their weights. The map is recorded in the checkpoint's layout, so the result
is moeinfer-format (transformers cannot load a router larger than its experts). With
`router="average"` each merged expert gets the usage-weighted average of its members' router rows:
a standard router, a checkpoint `transformers` loads, but the routing is only approximated (the
softmax of averaged logits is not the sum of the members' probabilities).

Shapes: N calibration tokens, D hidden, E experts, M merged experts, I expert inner size.

Steps:
1. features per expert: its router-logit column over the calibration tokens [N] (MC-SMoE,
   `similarity="router"`), or its mean output over them [D] (HC-SMoE, `similarity="output"`);
2. hierarchical clustering to `num_experts` clusters, within each DeepSeek group;
3. each cluster's weights averaged, weighted by how often the calibration tokens chose each member,
   after permuting every member's neurons to match the most used member's (`align`, MC-SMoE's
   weight matching, done greedily; moeinfer.compress.alignment);
4. the router: the map from original to merged experts, or averaged rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeinfer.compress.alignment import align
from moeinfer.compress.calibration import CalibrationData
from moeinfer.compress.clustering import LINKAGES, agglomerate
from moeinfer.compress.expert_stats import check_unmerged, expert_output, subsample
from moeinfer.formats.layout import replace_experts_
from moeinfer.compress.registry import register_method
from moeinfer.compress.selection import groups, per_group
from moeinfer.compress.surgery import layer_keep_counts, plain_experts
from moeinfer.model.moe import Experts, MoEBlock, route
from moeinfer.model.transformer import MoEModel


@dataclass(frozen=True)
class MergeParams:
    num_experts: int | None = None  # experts per layer after merging
    ratio: float | None = None  # or: fraction of each layer's experts merged away
    similarity: str = "output"  # "output" (HC-SMoE) or "router" (router logits, MC-SMoE)
    linkage: str = "average"  # "average", "single" or "complete"
    router: str = "map"  # "map" (exact gate-weight sums, moeinfer-format) or "average" (HF-loadable)
    align: bool = True  # permute each member's neurons to match the cluster's most used expert first
    max_tokens: int = 2048  # calibration tokens used for the features

    def __post_init__(self) -> None:
        if self.similarity not in ("output", "router"):
            raise ValueError(f"similarity must be 'output' or 'router', got {self.similarity!r}")
        if self.linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {', '.join(LINKAGES)}, got {self.linkage!r}")
        if self.router not in ("map", "average"):
            raise ValueError(f"router must be 'map' or 'average', got {self.router!r}")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


def features(block: MoEBlock, x: torch.Tensor, similarity: str) -> torch.Tensor:
    """Step 1: one feature vector per expert, [E, N] (router) or [E, D] (output)."""
    g = block.gate
    if similarity == "router":
        return torch.nn.functional.linear(x.float(), g.weight.float()).T
    ex = plain_experts(block, "merge")
    return torch.stack([expert_output(ex, e, x).mean(0) for e in range(ex.num_experts)])


def cluster(block: MoEBlock, feats: torch.Tensor, n: int, linkage: str) -> list[list[int]]:
    """Step 2: `n` clusters, the same number inside every DeepSeek group (clusters never cross groups)."""
    share = per_group(block, n, "merge")
    out: list[list[int]] = []
    for members in groups(block):
        out += [[members[i] for i in c] for c in agglomerate(feats[members], share, linkage)]
    return out


def merge_layer_(block: MoEBlock, clusters: list[list[int]], freq: torch.Tensor, router: str,
                 align_neurons: bool = True) -> None:
    """Steps 3-4: replace the layer's experts by the usage-weighted averages of `clusters`."""
    ex = plain_experts(block, "merge")
    E = ex.num_experts
    new = Experts(len(clusters), ex.gate_up_proj.shape[2], ex.down_proj.shape[2]).to(ex.gate_up_proj)
    new.requires_grad_(False)
    rows, biases = [], []
    expert_map = torch.empty(E, dtype=torch.long)
    bias = block.gate.e_score_correction_bias
    for m, members in enumerate(clusters):
        idx = torch.tensor(members)
        w = freq[idx].double()
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(members))  # unused cluster: plain mean
        gate_up, down = ex.gate_up_proj.data[idx].double(), ex.down_proj.data[idx].double()
        if align_neurons and len(members) > 1:  # 3. line the neurons up with the most used member's
            ref = int(w.argmax())
            for c in range(len(members)):
                if c != ref:
                    gate_up[c], down[c] = align(gate_up[ref], down[ref], gate_up[c], down[c])
        new.gate_up_proj.data[m] = torch.einsum("c,cij->ij", w, gate_up).to(new.gate_up_proj)
        new.down_proj.data[m] = torch.einsum("c,cij->ij", w, down).to(new.down_proj)
        expert_map[idx] = m
        rows.append((w[:, None] * block.gate.weight.data[idx].double()).sum(0))
        if bias is not None:
            biases.append((w * bias[idx].double()).sum())
    if router == "map":
        block.experts = new
        block.gate.expert_map = expert_map.to(block.gate.weight.device)
        block.gate.available = None
        return
    replace_experts_(block, new, torch.stack(rows).to(block.gate.weight),
                     None if bias is None else torch.stack(biases).to(bias))


@register_method("merge", params=MergeParams, needs="activations")
def merge(model: MoEModel, p: MergeParams, calib: CalibrationData, *, progress: bool = True) -> dict[str, Any]:
    """Merge each layer's experts by hierarchical clustering and usage-weighted averaging (HC-SMoE / MC-SMoE)."""
    from tqdm.auto import tqdm

    blocks = model.moe_blocks()
    counts = layer_keep_counts(blocks, keep=p.num_experts, ratio=p.ratio, method="merge")
    merged: dict[str, list[list[int]]] = {}
    for block, n in tqdm(list(zip(blocks, counts)), desc="merge", unit="layer", disable=not progress or None):
        check_unmerged(block, "merge")
        lc = calib.layer(block)
        x = subsample(lc.x, p.max_tokens)
        clusters = cluster(block, features(block, x, p.similarity), n, p.linkage)
        g = block.gate
        r = route(lc.x, g.weight, g.cfg, g.e_score_correction_bias)
        freq = torch.bincount(r.indices.reshape(-1), minlength=g.weight.shape[0]).float()
        merge_layer_(block, clusters, freq, p.router, p.align)
        merged[str(block.layer_idx)] = clusters
    return {"clusters": merged, "router": p.router}
