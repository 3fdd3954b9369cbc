"""Dynamic gating as a recipe step: give every router a routing mode (moeinfer.model.gating).

Modes: top-k:K, top-p:P (Huang et al., 2024), threshold:T (NAEE's dynamic skipping, Lu et al., 2024),
entropy:H; see moeinfer.model.gating. No weights change.

Steps:
1. parse and validate the mode;
2. set it on every MoE router;
3. record it in the config (`moeinfer_routing`), so the saved model keeps the mode when loaded
   (`moeinfer.load` re-applies it; `--routing default` on the CLI turns it off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moeinfer.compress.calibration import CalibrationData
from moeinfer.compress.registry import CompressionError, register_method
from moeinfer.model.gating import GatingError, parse_mode, set_routing_
from moeinfer.model.transformer import MoEModel


@dataclass(frozen=True)
class GatingParams:
    mode: str = "top-p:0.7"  # NAME:VALUE[:MAX_K], e.g. top-p:0.7, threshold:0.3, entropy:0.8, top-k:1

    def __post_init__(self) -> None:
        if parse_mode(self.mode) is None:  # 1. parse (raises on a bad mode)
            raise ValueError("mode must name a routing mode (top-k, top-p, threshold, entropy), not 'default'")


@register_method("gating", params=GatingParams, needs="none")
def gating(model: MoEModel, p: GatingParams, calib: CalibrationData | None, *,
           progress: bool = True) -> dict[str, Any]:
    """Route each token to a prefix of its top-k (top-p, threshold, entropy or fixed k); no retraining."""
    try:
        set_routing_(model, p.mode)  # 2.-3. every router, recorded in hf_config
    except GatingError as e:
        raise CompressionError(f"gating: {e}") from None
    return {"mode": str(parse_mode(p.mode))}
