"""Routing replay: force every router's decisions from a routing trace.

With it a model with random weights at a real model's shape behaves, for the expert cache, exactly
as the real model did (the traffic of Mixtral-8x7B on a random Mixtral-shaped model).
Shapes: N tokens of a forward, K top-k, E experts, L MoE layers.

1. `replay_routing_(model, trace)` checks the trace against the model (MoE layers, experts, top-k,
   no unused slots): a mismatch is a `TraceError` naming both shapes;
2. each block's router gets a `RoutingReplay` transform (in place of its route stage), all sharing
   one `ReplayCursor`;
3. the first MoE layer of a forward takes the next N trace rows (the tokens in row order: for
   batch 1 that is the prompt, then one row per decoded token); every layer of that forward reads
   its own column of those rows; the rows' weights are the combine weights;
4. running past the trace's end raises, unless `wrap=True` (start again at row 0).
`restore_routing_(model)` puts the original routers back.
"""

from __future__ import annotations

import torch
from torch import nn

from moeinfer.traces.trace import RoutingTrace, TraceError
from moeinfer.model.moe import Routing, RoutingTransform
from moeinfer.model.transformer import MoEModel


class ReplayCursor:
    """Which trace rows the current forward uses."""

    def __init__(self, trace: RoutingTrace, *, wrap: bool) -> None:
        self.trace, self.wrap = trace, wrap
        self.next = 0
        self.rows = torch.zeros(0, dtype=torch.long)

    def take(self, n: int) -> torch.Tensor:
        N = self.trace.num_tokens
        if self.next + n > N and not self.wrap:
            raise TraceError(f"routing replay ran out of trace: a forward needs rows {self.next}..{self.next + n - 1} "
                             f"but the trace has {N} tokens (pass wrap=True to cycle)")
        self.rows = torch.arange(self.next, self.next + n) % N
        self.next = (self.next + n) % N if self.wrap else self.next + n
        return self.rows


class RoutingReplay(RoutingTransform):
    """A routing transform that replaces the route stage: the trace's experts and weights for the
    cursor's rows (the router's matmul is skipped; later transforms still apply)."""

    name, order, replaces_route = "replay", 0, True

    def __init__(self, *, position: int, cursor: ReplayCursor, experts: torch.Tensor, weights: torch.Tensor) -> None:
        super().__init__()
        self.position, self.cursor = position, cursor
        self.register_buffer("trace_experts", experts, persistent=False)  # [N_trace, K] int64
        self.register_buffer("trace_weights", weights, persistent=False)  # [N_trace, K] fp32

    def forward(self, routing: Routing | None, router: nn.Module, x: torch.Tensor) -> Routing:
        n = x.shape[0]
        rows = self.cursor.take(n) if self.position == 0 else self.cursor.rows
        if rows.numel() != n:
            raise TraceError(f"routing replay: MoE layer {self.position} got {n} tokens, the forward's first "
                             f"MoE layer {rows.numel()}")
        rows = rows.to(self.trace_experts.device)
        indices, weights = self.trace_experts[rows], self.trace_weights[rows]
        E = router.weight.shape[0]
        logits = torch.full((n, E), -1e4, device=x.device).scatter_(1, indices.to(x.device),
                                                                    weights.clamp_min(1e-30).log().to(x.device))
        return Routing(indices=indices.to(x.device), weights=weights.to(x.device), logits=logits)


def check_trace(model: MoEModel, trace: RoutingTrace) -> None:
    blocks = model.moe_blocks()
    want = (len(blocks), blocks[0].experts.num_experts, model.config.top_k)
    got = (trace.num_layers, trace.num_experts, trace.top_k)
    if got != want:
        raise TraceError(f"routing trace has {got[0]} MoE layers x {got[1]} experts, top-{got[2]}; the model "
                         f"{want[0]} MoE layers x {want[1]} experts, top-{want[2]}: the trace does not fit the model")
    if (trace.experts < 0).any():
        raise TraceError("routing replay needs every token to use top_k experts; the trace has unused slots (-1)")


def replay_routing_(model: MoEModel, trace: RoutingTrace | str, *, wrap: bool = False) -> ReplayCursor:
    """Replace every router of `model` by a replay of `trace` (steps 1-4); returns the shared cursor."""
    if not isinstance(trace, RoutingTrace):
        trace = RoutingTrace.load(trace)
    check_trace(model, trace)
    cursor = ReplayCursor(trace, wrap=wrap)
    device = model.device
    for pos, block in enumerate(model.moe_blocks()):
        experts = torch.from_numpy(trace.experts[:, pos].astype("int64")).to(device)
        weights = torch.from_numpy(trace.weights[:, pos].astype("float32")).to(device)
        block.gate.add_transform(RoutingReplay(position=pos, cursor=cursor, experts=experts, weights=weights))
    return cursor


def restore_routing_(model: MoEModel) -> None:
    """Route with the routers' weights again (removes the replay transforms)."""
    for block in model.moe_blocks():
        block.gate.remove_transform("replay")
