"""Graceful degradation when experts fail (the survey's fault-tolerance gap, its section 6.2.2).

An expert whose weights cannot be used (a load error, a failed transfer, or a fault injected for
testing) is masked in its layer's router: tokens go to their next-best available experts, the model
keeps answering, and every rerouted token is counted.

Steps: 1. `mask(layer, expert)` marks the expert unavailable in that layer's Router;
2. the route stage removes masked experts from the choice before top-k (weights renormalise as the
architecture does) and records in `Routing.rerouted` the tokens whose unmasked top-k held a masked
expert; 3. a routing counter (moeinfer.model.counters), attached while any expert is masked, sums them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from moeinfer.model.counters import RoutingCounter
from moeinfer.model.moe import MoEBlock, Routing
from moeinfer.model.transformer import MoEModel


def parse_fault(spec: str) -> tuple[int, int]:
    """'LAYER:EXPERT' -> (layer, expert)."""
    try:
        layer, expert = (int(p) for p in spec.split(":"))
    except ValueError:
        raise ValueError(f"expert fault {spec!r} must be LAYER:EXPERT, e.g. 3:5") from None
    return layer, expert


class ExpertFaults:
    """Which experts are masked, per layer, and how many tokens were rerouted because of it."""

    def __init__(self, model: MoEModel) -> None:
        self.model = model
        self.blocks: dict[int, MoEBlock] = {b.layer_idx: b for b in model.moe_blocks()}
        self.reasons: dict[tuple[int, int], str] = dict(getattr(model, "failed_experts", {}))
        # Counting observes every routing (and so keeps decode out of a CUDA graph): only once an
        # expert is masked, when there is something to count.
        self.counter: RoutingCounter | None = RoutingCounter.attach(model) if self.reasons else None

    def mask(self, layer: int, expert: int, reason: str = "injected") -> None:
        if layer not in self.blocks:
            raise ValueError(f"layer {layer} has no MoE block; MoE layers: {sorted(self.blocks)}")
        try:
            self.blocks[layer].gate.mask_expert(expert)
        except ValueError as e:
            raise ValueError(f"layer {layer}: {e}") from None
        self.reasons[(layer, expert)] = reason
        if self.counter is None:
            self.counter = RoutingCounter.attach(self.model)

    def masked(self) -> list[tuple[int, int]]:
        return sorted(self.reasons)

    def count(self) -> int:
        return len(self.reasons)

    @property
    def degraded_tokens(self) -> int:
        """Tokens routed away from a masked expert since the first expert was masked."""
        return self.counter.rerouted if self.counter is not None else 0


class ExpertLoad:
    """Tokens routed to each expert of each MoE layer, counted by a routing observer."""

    def __init__(self, model: MoEModel) -> None:
        self.counts: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(0, dtype=np.int64))
        self.handles: list[Any] = []
        for block in model.moe_blocks():
            E = block.experts.num_experts
            self.counts[block.layer_idx] = np.zeros(E, dtype=np.int64)
            self.handles.append(block.add_routing_observer(self._observer(E)))

    def _observer(self, num_experts: int):  # noqa: ANN202
        def observe(layer: int, routing: Routing) -> None:
            self.counts[layer] += torch.bincount(routing.indices.reshape(-1), minlength=num_experts).cpu().numpy()

        return observe

    def detach(self) -> None:
        """Stop counting (the counts so far stay)."""
        for h in self.handles:
            h.remove()
        self.handles = []
