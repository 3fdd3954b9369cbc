"""Routing counters as a routing observer: tokens routed, expert slots used and tokens rerouted off a
masked expert, over every MoE block of a model, from the `Routing` each block's router produced.

The router itself keeps no counters (they would be state written on every forward, and a host read
inside a decode step that should be a CUDA graph); whoever wants the numbers attaches a counter and
detaches it when done: dynamic gating's experts per token (moeinfer.model.gating), degraded tokens
under expert faults (moeinfer.engine.faults), the compression benchmark.
"""

from __future__ import annotations

from typing import Any

from moeinfer.model.moe import ObserverHandle, Routing


class RoutingCounter:
    """Counts, from the moment it is attached (`attach(model)`) until `remove()`:
    tokens (routing decisions, one per token per MoE layer), slots (experts run: K per token, or the
    token's k under dynamic gating) and rerouted (tokens that wanted a masked expert)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.slots = 0
        self.rerouted = 0
        self._handle: ObserverHandle | None = None

    @classmethod
    def attach(cls, model: Any) -> RoutingCounter:
        """A counter observing every MoE block of `model` (one observer, added with a handle)."""
        counter = cls()
        counter._handle = model.add_routing_observer(counter)
        return counter

    def __call__(self, layer_idx: int, routing: Routing) -> None:
        n, k = routing.indices.shape
        self.tokens += n
        self.slots += n * k if routing.k is None else int(routing.k.sum())
        if routing.rerouted is not None:
            self.rerouted += int(routing.rerouted)

    def per_token(self) -> float:
        """Average experts run per token per MoE layer (0.0 before any token)."""
        return self.slots / self.tokens if self.tokens else 0.0

    def reset(self) -> None:
        self.tokens = self.slots = self.rerouted = 0

    def remove(self) -> None:
        """Detach from the model (the counts stay readable)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
