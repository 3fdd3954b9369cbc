"""Agglomerative (hierarchical) clustering of a layer's experts, for expert merging (HC-SMoE).

Shapes: E items (experts), F feature size.

Steps:
1. distance between items = 1 - cosine similarity of their feature vectors;
2. start from one cluster per item and repeatedly join the two closest clusters, the distance of two
   clusters being the average ("average"), smallest ("single") or largest ("complete") distance
   between their members, until `n` clusters remain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LINKAGES = ("average", "single", "complete")


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """features [E, F] -> distances [E, E] in [0, 2]."""
    f = F.normalize(features.double(), dim=-1)
    return (1 - f @ f.T).clamp_min(0)


def agglomerate(features: torch.Tensor, n: int, linkage: str = "average") -> list[list[int]]:
    """Cluster the rows of features [E, F] into `n` clusters; each sorted, clusters by first member."""
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {', '.join(LINKAGES)}, got {linkage!r}")
    E = features.shape[0]
    if not 1 <= n <= E:
        raise ValueError(f"cannot make {n} clusters of {E} items")
    d = cosine_distance(features)  # 1. pairwise distances
    clusters = [[i] for i in range(E)]
    reduce = {"average": torch.mean, "single": torch.min, "complete": torch.max}[linkage]
    while len(clusters) > n:  # 2. join the closest pair
        best: tuple[float, int, int] | None = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                dist = float(reduce(d[clusters[a]][:, clusters[b]]))
                if best is None or dist < best[0]:
                    best = (dist, a, b)
        assert best is not None
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters)
