"""The MoE block, eager reference: route -> dispatch -> expert compute -> combine.

Shapes: N tokens (B*T flattened), D hidden, E experts, K top-k, I expert inner size,
S = N*K token-slots.

    x [N,D] --route--> indices [N,K], weights [N,K]
            --dispatch--> slots sorted by expert: order [S], counts [E]
            --expert compute--> y [S,D] = down_e(silu(gate_e x) * up_e x)
            --combine--> out [N,D] = sum_k weights[n,k] * y[slot(n,k)]  (+ shared expert)

Every later fast path (kernels, offload, quantized experts, expert parallelism) replaces one stage
and is tested against these functions. The routing rules follow each model family's paper:
Mixtral (Jiang et al., 2024), Qwen-MoE, OLMoE (Muennighoff et al., 2024), DeepSeek-V2/V3
(group-limited routing, sigmoid scores with an auxiliary-loss-free correction bias).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from moeinfer.config import ModelConfig, RouterConfig
from moeinfer.model.mlp import DenseMLP, swiglu


@dataclass
class Routing:
    """Output of the route stage; weights are fp32."""

    indices: torch.Tensor  # [N, K] int64
    weights: torch.Tensor  # [N, K] fp32
    logits: torch.Tensor  # [N, E] fp32
    rerouted: torch.Tensor | None = None  # tokens moved off a masked expert (scalar), when any are masked
    k: torch.Tensor | None = None  # [N] int64: token n uses its first k[n] slots (dynamic gating); None = all K


@dataclass
class Dispatch:
    """Token-slots grouped by expert (stable order: expert, then token, then k)."""

    order: torch.Tensor  # [S] slot ids (n*K + k) sorted by expert
    tokens: torch.Tensor  # [S] token id of each sorted slot
    counts: torch.Tensor  # [E] slots per expert


def route(x: torch.Tensor, weight: torch.Tensor, cfg: RouterConfig,
          bias: torch.Tensor | None = None, *, top_k: int | None = None,
          available: torch.Tensor | None = None) -> Routing:
    """x [N, D], weight [E, D] -> Routing. Steps mirror RouterConfig's docstring.

    `available` [E] bool removes failed experts from the choice (moeinfer.engine.faults); the tokens
    that would have used one are counted in `Routing.rerouted`.
    """
    return select(F.linear(x.float(), weight.float()), cfg, bias, top_k=top_k, available=available)


def select(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None, *,
           top_k: int | None = None, available: torch.Tensor | None = None) -> Routing:
    """The route stage after the router matmul: logits [N, E] fp32 -> Routing (scores, group limit,
    top-k, weights). Expert masking re-runs it on the same logits with `available`."""
    k = top_k or cfg.top_k
    scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias.float()
    if cfg.n_group > 1:
        grouped = choice.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group)
        if cfg.group_score == "max":
            group_scores = grouped.max(-1).values
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep_groups = group_scores.topk(cfg.topk_group, dim=-1).indices  # [N, G']
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
        expert_mask = group_mask.repeat_interleave(cfg.num_experts // cfg.n_group, dim=1)
        if cfg.score_func == "softmax" and bias is None:
            # DeepSeek-V2 zeroes the scores of dropped groups and takes the weights from them too, so
            # an expert picked there (top_k > experts kept) gets weight 0.
            choice = scores = choice.masked_fill(~expert_mask, 0.0)
        else:
            # DeepSeek-V3 excludes them from the choice only; weights come from the unmasked scores.
            choice = choice.masked_fill(~expert_mask, float("-inf"))
    rerouted = None
    if available is not None:
        wanted = choice.topk(k, dim=-1).indices
        rerouted = (~available[wanted]).any(-1).sum()
        choice = choice.masked_fill(~available, float("-inf"))
    if choice is scores:  # the chosen scores are the weights: topk's values are exactly what gather reads
        weights, indices = choice.topk(k, dim=-1)  # [N, K]
    else:
        indices = choice.topk(k, dim=-1).indices  # [N, K]
        weights = scores.gather(1, indices)
    if cfg.norm_topk_prob:
        total = weights.sum(-1, keepdim=True)
        weights = weights / (total + 1e-20 if cfg.score_func == "sigmoid" else total)
    # (adding 0.0 to a positive sum, or scaling by 1.0, changes no bit: those ops are skipped)
    return Routing(indices=indices, weights=weights * cfg.scaling if cfg.scaling != 1.0 else weights, logits=logits,
                   rerouted=rerouted)


def dispatch(indices: torch.Tensor, num_experts: int) -> Dispatch:
    """indices [N, K] -> slots sorted by expert."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return Dispatch(order=order, tokens=order // indices.shape[1],
                    counts=torch.bincount(flat, minlength=num_experts))


def expert_compute(x_sorted: torch.Tensor, counts: torch.Tensor,
                   gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x_sorted [S, D] grouped by expert, gate_up [E, 2I, D], down [E, D, I] -> y [S, D]."""
    y = torch.empty_like(x_sorted)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        y[start:start + n] = swiglu(x_sorted[start:start + n], gate_up[e], down[e])
        start += n
    return y


def routed_forward(x: torch.Tensor, routing: Routing, num_experts: int,
                   expert_fn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """dispatch -> expert_fn(e, x_e [n_e, D]) -> [n_e, D] for each expert with slots -> combine.

    The expert stage of experts modules whose weights are not stacked tensors (quantized, low-rank):
    only experts that received slots are computed."""
    d = dispatch(routing.indices, num_experts)
    xs = x[d.tokens]  # [S, D]
    y = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(d.counts.tolist()):
        if n:
            y[start:start + n] = expert_fn(e, xs[start:start + n])
            start += n
    return combine(y, d, routing.weights, x.shape[0])


def combine(y_sorted: torch.Tensor, d: Dispatch, weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: y_sorted [S, D] -> out [N, D]."""
    w = weights.reshape(-1)[d.order].to(y_sorted.dtype)  # [S]
    out = torch.zeros(num_tokens, y_sorted.shape[-1], dtype=y_sorted.dtype, device=y_sorted.device)
    return out.index_add_(0, d.tokens, y_sorted * w[:, None])


def fold_duplicates(routing: Routing, expert_map: torch.Tensor) -> Routing:
    """Merged experts: map router experts to expert rows; a token that picked two experts now merged
    into one gets that one once, with their weights added (its other slots move past its k)."""
    idx = expert_map[routing.indices]  # [N, K]
    K = idx.shape[1]
    slot = torch.arange(K, device=idx.device)
    valid = slot[None] < (routing.k[:, None] if routing.k is not None else K)  # [N, K]
    same = (idx[:, :, None] == idx[:, None, :]) & valid[:, None, :] & valid[:, :, None]  # [N, K, K]
    first = valid & ~(same & (slot[None, :] < slot[:, None])[None]).any(-1)  # no equal slot before it
    if bool((first == valid).all()):
        return dataclasses.replace(routing, indices=idx)
    summed = (same.float() * routing.weights[:, None, :]).sum(-1)  # [N, K] weight of each slot's expert
    order = torch.argsort((~first).int(), dim=1, stable=True)  # first occurrences first, in order
    return dataclasses.replace(routing, indices=idx.gather(1, order), weights=summed.gather(1, order),
                               k=first.sum(-1))


class RoutingTransform(nn.Module):
    """One step applied to the route stage's Routing, in the router's ordered `transforms` list.

    `order` fixes where a transform runs whatever the order they were added in (replay 0, expert
    masking 10, dynamic gating 20, merged-expert folding 30); `graph_safe` says whether it runs
    without reading tensors back to the host (so a decode step using it can be a CUDA graph);
    `replaces_route` transforms (replay) produce the routing themselves, the router's matmul is skipped.
    """

    name = "transform"
    order = 50
    graph_safe = False
    replaces_route = False

    def forward(self, routing: Routing | None, router: Router, x: torch.Tensor) -> Routing:  # noqa: D102
        raise NotImplementedError


class ExpertMask(RoutingTransform):
    """Failed experts removed from the choice (moeinfer.engine.faults): the selection is re-run on the
    same logits without them; the tokens that wanted one are counted in `Routing.rerouted` (observers
    read it: moeinfer.model.counters)."""

    name, order = "mask", 10

    def __init__(self, available: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("available", available, persistent=False)  # [E] bool

    def forward(self, routing: Routing | None, router: Router, x: torch.Tensor) -> Routing:
        assert routing is not None
        return select(routing.logits, router.cfg, router.e_score_correction_bias, top_k=router.top_k,
                      available=self.available)


class DynamicGating(RoutingTransform):
    """Dynamic gating (moeinfer.model.gating): `mode(routing, cfg)` gives each token a prefix k[n] of
    its top-k; the block then runs tokens grouped by k (which reads k back to the host)."""

    name, order = "gating", 20

    def __init__(self, mode: Callable[[Routing, RouterConfig], Routing]) -> None:
        super().__init__()
        self.mode = mode

    def extra_repr(self) -> str:
        return str(self.mode)

    def forward(self, routing: Routing | None, router: Router, x: torch.Tensor) -> Routing:
        assert routing is not None
        return self.mode(routing, router.cfg)


class MergedExperts(RoutingTransform):
    """Merged experts (moeinfer.compress.methods.merge): router expert e runs experts row expert_map[e];
    a token that picked two experts merged into one gets it once (`fold_duplicates`)."""

    name, order = "merge", 30

    def __init__(self, expert_map: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("expert_map", expert_map, persistent=False)  # [E] int64

    def forward(self, routing: Routing | None, router: Router, x: torch.Tensor) -> Routing:
        assert routing is not None
        return fold_duplicates(routing, self.expert_map)


class Router(nn.Module):
    """Holds the router weight [E, D] (and DeepSeek-V3's correction bias [E]), and the ordered list of
    routing transforms applied after the route stage (`transforms`: see RoutingTransform)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.cfg = config.router
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if config.router.correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))
        else:
            self.e_score_correction_bias = None
        self.top_k: int | None = None  # override of cfg.top_k at run time (dynamic gating)
        self.transforms = nn.ModuleList()  # RoutingTransform, sorted by `order`

    # The transform list.
    def add_transform(self, transform: RoutingTransform) -> RoutingTransform:
        """Insert `transform` at its place by `order`, replacing one of the same name."""
        self.remove_transform(transform.name)
        at = next((i for i, t in enumerate(self.transforms) if t.order > transform.order), len(self.transforms))
        self.transforms.insert(at, transform)
        return transform

    def remove_transform(self, name: str) -> RoutingTransform | None:
        for i, t in enumerate(self.transforms):
            if t.name == name:
                del self.transforms[i]
                return t
        return None

    def get_transform(self, name: str) -> Any:
        return next((t for t in self.transforms if t.name == name), None)

    # Views of the transforms by what they hold (read by saving, graph capture, expert parallelism).
    @property
    def available(self) -> torch.Tensor | None:
        """[E] bool of the experts not masked; None = all (see moeinfer.engine.faults)."""
        t = self.get_transform("mask")
        return None if t is None else t.available

    @available.setter
    def available(self, value: torch.Tensor | None) -> None:
        self.remove_transform("mask") if value is None else self.add_transform(ExpertMask(value))

    @property
    def expert_map(self) -> torch.Tensor | None:
        """[E] int64 experts row of each router expert (merged experts); None = identity."""
        t = self.get_transform("merge")
        return None if t is None else t.expert_map

    @expert_map.setter
    def expert_map(self, value: torch.Tensor | None) -> None:
        self.remove_transform("merge") if value is None else self.add_transform(MergedExperts(value))

    @property
    def mode(self) -> Any:
        """The dynamic-gating mode (moeinfer.model.gating.GatingMode) or None."""
        t = self.get_transform("gating")
        return None if t is None else t.mode

    @mode.setter
    def mode(self, value: Callable[[Routing, RouterConfig], Routing] | None) -> None:
        self.remove_transform("gating") if value is None else self.add_transform(DynamicGating(value))

    def mask_expert(self, expert: int) -> None:
        """Remove `expert` from the choice (its weights failed); at least top_k experts must remain."""
        E = self.weight.shape[0]
        if not 0 <= expert < E:
            raise ValueError(f"expert {expert} does not exist (0..{E - 1})")
        available = (self.available.clone() if self.available is not None
                     else torch.ones(E, dtype=torch.bool, device=self.weight.device))
        available[expert] = False
        k = self.top_k or self.cfg.top_k
        if int(available.sum()) < k:
            raise ValueError(f"cannot mask expert {expert}: fewer than top_k={k} experts would remain")
        self.available = available

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> router logits [N, E] fp32, the matmul of `route` (a kernel may override it:
        moeinfer.kernels.router)."""
        return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor) -> Routing:
        transforms = list(self.transforms)
        if transforms and transforms[0].replaces_route:
            routing = transforms.pop(0)(None, self, x)
        else:  # `route`, with this router's matmul
            routing = select(self.logits(x), self.cfg, self.e_score_correction_bias, top_k=self.top_k)
        for t in transforms:
            routing = t(routing, self, x)
        return routing


@runtime_checkable
class ExpertStage(Protocol):
    """The expert stage of an MoE block: what every experts module (stacked `Experts`, quantized,
    low-rank, offloaded, expert-parallel) provides, so kernels, graph capture and saving ask it
    rather than guess from its type.

    - `forward(x [N, D], routing) -> [N, D]`: dispatch, expert compute and combine;
    - `num_experts`: expert rows it holds;
    - `kernels`: the kernel names it can run (`use_kernel_` refuses others with a clear error);
      None = every registered kernel for stacked float weights (moeinfer.kernels);
    - `kernel`: the one it runs now;
    - `graph_safe`: its forward reads nothing back to the host, so a CUDA graph can capture it.
    """

    kernels: tuple[str, ...] | None
    kernel: str

    @property
    def num_experts(self) -> int: ...

    @property
    def graph_safe(self) -> bool: ...

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor: ...


class Experts(nn.Module):
    """Stacked expert weights: gate_up_proj [E, 2I, D] (gate rows first), down_proj [E, D, I].

    The stage runs the eager reference below unless moeinfer.kernels.use_kernel_ chose a kernel
    (`kernel_fn`, optionally on `compute_weights`, e.g. fp32 copies of a bf16 model's experts).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.kernel = "reference"
        self.kernel_fn: Callable[..., torch.Tensor] | None = None  # None = the eager stages
        self.kernel_graph_safe = False  # the eager stages read expert counts back to the host
        self.compute_weights: tuple[torch.Tensor, torch.Tensor] | None = None  # (gate_up, down) to compute with

    kernels = None  # ExpertStage: every registered kernel runs stacked float experts

    @property
    def graph_safe(self) -> bool:
        return self.kernel_graph_safe

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [N, D] -> weighted sum of the routed experts' outputs [N, D] (dispatch/compute/combine)."""
        if self.kernel_fn is not None:
            gate_up, down = self.compute_weights or (self.gate_up_proj, self.down_proj)
            return self.kernel_fn(x.to(gate_up.dtype), routing.indices, routing.weights, gate_up, down).to(x.dtype)
        d = dispatch(routing.indices, self.num_experts)
        y = expert_compute(x[d.tokens], d.counts, self.gate_up_proj, self.down_proj)
        return combine(y, d, routing.weights, x.shape[0])


RoutingObserver = Callable[[int, Routing], None]


class ObserverHandle:
    """Returned by `add_routing_observer` / `add_token_observer`: `remove()` detaches exactly that
    observer (from every list it was added to), whatever was added or removed since."""

    def __init__(self, lists: list[list[Any]], fn: Any) -> None:
        self._lists, self.fn = lists, fn

    def remove(self) -> None:
        for observers in self._lists:
            for i, f in enumerate(observers):
                if f is self.fn:
                    del observers[i]
                    break
        self._lists = []

    def __enter__(self) -> ObserverHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def combined(observers: list[Any]) -> Any:
    """The observers as one callable (None when there are none): the view `observer` attributes give."""
    if not observers:
        return None
    if len(observers) == 1:
        return observers[0]
    snapshot = list(observers)

    def call_all(*args: Any) -> None:
        for f in snapshot:
            f(*args)

    return call_all


class MoEBlock(nn.Module):
    """Router + routed experts + optional shared expert (DeepSeek, Qwen2-MoE's sigmoid-gated one)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Router(config)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert = (DenseMLP(config.hidden_size, config.shared_intermediate_size)
                              if config.shared_intermediate_size else None)
        self.shared_expert_gate = (nn.Linear(config.hidden_size, 1, bias=False)
                                   if config.shared_expert_gate else None)
        self.routing_observers: list[RoutingObserver] = []  # called in order with (layer_idx, routing)

    def add_routing_observer(self, fn: RoutingObserver) -> ObserverHandle:
        """Call `fn(layer_idx, routing)` on every routing decision of this block until `handle.remove()`."""
        self.routing_observers.append(fn)
        return ObserverHandle([self.routing_observers], fn)

    @property
    def observer(self) -> RoutingObserver | None:
        """The observers as one callable (None = none); assigning replaces them all (None clears)."""
        return combined(self.routing_observers)

    @observer.setter
    def observer(self, fn: RoutingObserver | None) -> None:
        self.routing_observers[:] = [] if fn is None else [fn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.stages(x.reshape(-1, shape[-1]), self.experts).view(shape)

    def stages(self, x: torch.Tensor, experts: Callable[[torch.Tensor, Routing], torch.Tensor]) -> torch.Tensor:
        """The block on x [N, D] with `experts(x, routing)` as its expert stage (forward passes the experts
        module; moeinfer.engine.cpu_decode a prepared call of it) -> [N, D]."""
        routing = self.gate(x)
        for fn in self.routing_observers:
            fn(self.layer_idx, routing)
        out = experts(x, routing) if routing.k is None else self._experts_by_k(x, routing)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out

    def _experts_by_k(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Dynamic gating: tokens grouped by their k, each group run on its first k slots (<= K calls),
        so any experts module (kernels, offload, quantized) runs unchanged."""
        out = torch.zeros_like(x)
        for k in routing.k.unique().tolist():
            rows = (routing.k == k).nonzero().squeeze(1)
            part = Routing(indices=routing.indices[rows, :k], weights=routing.weights[rows, :k],
                           logits=routing.logits[rows])
            out.index_copy_(0, rows, self.experts(x[rows], part).to(out.dtype))
        return out
