"""Expert pruning by routing frequency (SEER-MoE, Muzio et al., 2024, "SEER-MoE: Sparse Expert
Efficiency through Regularization for Mixture-of-Experts"; its heavy-hitters counting).

Steps:
1. route the calibration tokens (text or a routing trace) through each layer's router;
2. count how often each expert is chosen (or sum its gate weights: `score="gate"`);
3. keep the `keep` most used experts per layer (or remove `ratio` of them); the router's rows go
   with the removed experts and the top-k renormalises over those left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moeinfer.compress.calibration import CalibrationData
from moeinfer.compress.registry import register_method
from moeinfer.compress.selection import select_top
from moeinfer.compress.surgery import prune_layers_
from moeinfer.model.moe import MoEBlock
from moeinfer.model.transformer import MoEModel


@dataclass(frozen=True)
class FrequencyPruneParams:
    keep: int | None = None  # experts kept per layer
    ratio: float | None = None  # or: fraction of each layer's experts removed
    score: str = "count"  # "count" (tokens routed) or "gate" (sum of gate weights)

    def __post_init__(self) -> None:
        if self.score not in ("count", "gate"):
            raise ValueError(f"score must be 'count' or 'gate', got {self.score!r}")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")


@register_method("prune_frequency", params=FrequencyPruneParams, needs="routing")
def prune_frequency(model: MoEModel, p: FrequencyPruneParams, calib: CalibrationData, *,
                    progress: bool = True) -> dict[str, Any]:
    """Remove the least-used experts of every layer (SEER-MoE-style heavy-hitter counting)."""
    def choose(block: MoEBlock, n: int) -> list[int]:
        lc = calib.layer(block)  # 1. route
        score = lc.frequency(block) if p.score == "count" else lc.gate_mass(block)  # 2. count
        return select_top(block, score, n, "prune_frequency")  # 3. keep the heaviest (per DeepSeek group)

    return {"kept": prune_layers_(model.moe_blocks(), keep=p.keep, ratio=p.ratio, method="prune_frequency",
                                  choose=choose)}
