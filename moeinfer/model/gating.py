"""Dynamic gating at inference, no retraining: each token keeps a *prefix* of its top-k experts.

Shapes: N tokens, E experts, K top-k (slots are sorted by score, best first).

Modes (written `NAME:VALUE`, e.g. on the CLI `--routing top-p:0.7`):
  top-k:k          a fixed k (the router's `top_k` override);
  top-p:p          the fewest leading slots whose routing probability reaches mass p (Huang et al., 2024,
                   "Harder Tasks Need More Experts: Dynamic Routing in MoE Models");
  threshold:t      the slots whose weight is >= t x the top-1 weight (NAEE's dynamic skipping, Lu et al.,
                   2024, "Not All Experts are Equal");
  entropy:h        k = ceil(K * H / h), H the token's routing entropy / log E: confident tokens use fewer
                   experts, a token at normalised entropy >= h uses all K.
A mode may end with `:max_k` (e.g. `top-p:0.9:4`) to choose among more than the model's K slots.

Steps (`GatingMode.__call__`, run by `Router.forward` after the route stage):
1. probabilities p [N, E]: softmax of the logits (sigmoid scores normalised to sum to one for DeepSeek-V3);
2. the rule gives k [N] in 1..K from p and the slots' weights;
3. with `norm_topk_prob` the kept weights are renormalised (as if the model had routed to k experts),
   otherwise they stay raw probabilities;
4. `MoEBlock` runs each group of tokens with equal k on their first k slots; a routing counter
   (moeinfer.model.counters.RoutingCounter) reports the experts run per token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from moeinfer.config import RouterConfig
from moeinfer.model.moe import Routing

MODES = ("top-k", "top-p", "threshold", "entropy")


class GatingError(ValueError):
    """A routing mode string or value is not valid."""


@dataclass(frozen=True)
class GatingMode:
    kind: str
    value: float
    max_k: int | None = None  # route over this many slots (default: the model's top_k)

    def __post_init__(self) -> None:
        if self.kind not in MODES:
            raise GatingError(f"unknown routing mode {self.kind!r}; modes: {', '.join(MODES)} "
                              f"(written NAME:VALUE, e.g. top-p:0.7)")
        v = self.value
        ok = {"top-k": v >= 1 and float(v).is_integer(), "top-p": 0 < v <= 1, "threshold": 0 <= v <= 1,
              "entropy": 0 < v <= 1}[self.kind]
        if not ok:
            allowed = {"top-k": "an integer >= 1", "top-p": "a mass in (0, 1]", "threshold": "a ratio in [0, 1]",
                       "entropy": "a normalised entropy in (0, 1]"}[self.kind]
            raise GatingError(f"routing mode {self.kind}: value must be {allowed}, got {v}")
        if self.max_k is not None and (self.kind == "top-k" or self.max_k < 1):
            raise GatingError(f"routing mode {self}: max_k must be >= 1 and is not used with top-k")

    def __str__(self) -> str:
        v = int(self.value) if self.kind == "top-k" else self.value
        return f"{self.kind}:{v}" + (f":{self.max_k}" if self.max_k else "")

    def __call__(self, routing: Routing, cfg: RouterConfig) -> Routing:
        w = routing.weights  # [N, K] fp32, slots best first
        N, K = w.shape
        if N == 0:
            return routing
        # 1. probabilities over all experts
        if cfg.score_func == "softmax":
            p = routing.logits.softmax(-1)
        else:
            s = routing.logits.sigmoid()
            p = s / s.sum(-1, keepdim=True)
        p_slots = p.gather(1, routing.indices)  # [N, K]
        # 2. k per token
        if self.kind == "top-p":
            before = p_slots.cumsum(-1) - p_slots  # mass of the slots before each slot
            k = (before < self.value - 1e-6).sum(-1)
        elif self.kind == "threshold":
            keep = w >= self.value * w[:, :1]
            k = keep.int().cumprod(-1).sum(-1)  # the leading run of kept slots
        elif self.kind == "entropy":
            h = -(p * p.clamp_min(1e-20).log()).sum(-1) / math.log(max(p.shape[1], 2))
            k = torch.ceil(K * h / self.value)
        else:
            k = torch.full((N,), int(self.value))
        k = k.clamp(1, K).long()
        if bool((k == K).all()):
            return routing
        # 3. renormalise the kept prefix as the routing config does for its top-k
        if cfg.norm_topk_prob:
            kept = torch.arange(K, device=w.device)[None] < k[:, None]
            raw = w / cfg.scaling
            w = raw / (raw * kept).sum(-1, keepdim=True).clamp_min(1e-20) * cfg.scaling
        return dataclasses.replace(routing, weights=w, k=k)


def parse_mode(text: str | GatingMode | None) -> GatingMode | None:
    """'top-p:0.7' (or 'top-p:0.9:4', a GatingMode, None / 'default') -> GatingMode | None."""
    if text is None or isinstance(text, GatingMode):
        return text
    text = str(text).strip()
    if text in ("", "default", "none"):
        return None
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise GatingError(f"routing mode {text!r}: expected NAME:VALUE[:MAX_K] with NAME one of {', '.join(MODES)}")
    try:
        value = float(parts[1])
        max_k = int(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise GatingError(f"routing mode {text!r}: value and max_k must be numbers") from None
    return GatingMode(parts[0], value, max_k)


def set_routing_(model: Any, mode: str | GatingMode | None) -> Any:
    """Give every MoE router of `model` the routing mode (None or 'default' restores top-k routing).

    The mode is written to `model.config.hf_config["moeinfer_routing"]`, so `moeinfer.save` keeps it
    and `moeinfer.load` re-applies it."""
    m = parse_mode(mode)
    if m is not None and m.kind != "top-k" and any(getattr(b.experts, "collective", False) for b in model.moe_blocks()):
        raise GatingError(f"routing mode {m} gives each token its own k, which expert parallelism cannot run "
                          "(ranks would run different numbers of all-to-alls); use a fixed top-k:K")
    for block in model.moe_blocks():
        gate = block.gate
        K = gate.cfg.top_k
        E = gate.weight.shape[0]
        k = int(m.value) if m is not None and m.kind == "top-k" else (m.max_k if m is not None else None)
        if k is not None and k > E:
            raise GatingError(f"routing mode {m}: layer {block.layer_idx} has only {E} experts")
        gate.top_k = None if k is None or (k == K and m.kind == "top-k") else k
        gate.mode = None if m is None or m.kind == "top-k" else m
    if m is None:
        model.config.hf_config.pop("moeinfer_routing", None)
    else:
        model.config.hf_config["moeinfer_routing"] = str(m)
    return model
