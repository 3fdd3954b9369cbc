"""Expert prefetchers (registry): predict the experts of a later MoE layer while the current one runs.

Shapes: n tokens of the step, K top-k, E experts, L MoE layers, D hidden.

After layer l is routed, `predict(ctx)` returns (target layer, experts) pairs; the cache places
them (`ExpertCache.prefetch`) and the loads run in the background behind layer l's compute. The
cache scores every prediction against the target layer's real visit (precision and recall).

| name | follows | predicts layer l+k's experts from |
|---|---|---|
| none | | nothing |
| next-layer | Mixtral-offloading (Eliseev & Mazur, 2023), AdapMoE, HOBBIT | layer l+1's router applied to layer l's MoE input (live runs only: needs hidden states) |
| transition | EdgeMoE (Yi et al., 2023) | a table of cross-layer co-activation counts T[l, e, e'] from a calibration trace |
| mlp | ProMoE (Song et al., 2024) | a small MLP per layer pair trained on a calibration trace; its input is layer l's routing (gate-weighted one-hot [E]) rather than the hidden state, so the simulator can run it on traces |
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moeinfer.model.moe import route
from moeinfer.offload.registry import build, calibration_trace

PrefetchFactory = Callable[..., "Prefetcher"]
PREFETCHERS: dict[str, PrefetchFactory] = {}


def register_prefetcher(name: str) -> Callable[[PrefetchFactory], PrefetchFactory]:
    def deco(cls: PrefetchFactory) -> PrefetchFactory:
        PREFETCHERS[name] = cls
        return cls
    return deco


@dataclass
class PrefetchContext:
    num_layers: int
    num_experts: int
    top_k: int
    calibration: Any = None  # RoutingTrace | None
    routers: list[Any] | None = None  # the model's Router modules, one per MoE layer (live runs)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerContext:
    """What a prefetcher sees after MoE layer `layer` was routed."""

    layer: int
    experts: np.ndarray  # [n, K] int, -1 = unused slot
    weights: np.ndarray  # [n, K] float
    hidden: torch.Tensor | None = None  # [n, D] the block's input (live runs only)


class Prefetcher:
    """Base: predicts nothing. `distance` k: predict layer l+k; `per_token`: experts per token."""

    name = "none"
    needs_hidden = False

    def __init__(self, *, distance: int = 1, per_token: int | None = None) -> None:
        if distance < 1:
            raise ValueError(f"prefetch distance must be >= 1, got {distance}")
        self.distance = distance
        self.per_token = per_token

    def bind(self, ctx: PrefetchContext) -> None:
        self.ctx = ctx
        self.m = self.per_token or ctx.top_k

    def target(self, layer: int) -> int | None:
        t = layer + self.distance
        return t if t < self.ctx.num_layers else None

    def predict(self, c: LayerContext) -> list[tuple[int, list[int]]]:
        return []

    def _union_top(self, scores: np.ndarray) -> list[int]:
        """scores [n, E] -> sorted union over tokens of each token's top-m experts."""
        top = np.argsort(-scores, axis=1, kind="stable")[:, :self.m]
        return sorted(set(top.reshape(-1).tolist()))


def make_prefetcher(name: str, ctx: PrefetchContext, **kwargs: Any) -> Prefetcher:
    return build("prefetcher", PREFETCHERS, name, ctx, kwargs)


def _calibration(name: str, ctx: PrefetchContext) -> Any:
    return calibration_trace("prefetcher", name, ctx)


def routing_features(experts: np.ndarray, weights: np.ndarray, num_experts: int) -> np.ndarray:
    """experts, weights [n, K] -> gate-weighted one-hot [n, E] (unused slots ignored)."""
    n = experts.shape[0]
    out = np.zeros((n, num_experts), dtype=np.float32)
    rows = np.repeat(np.arange(n), experts.shape[1])
    e, w = experts.reshape(-1), weights.reshape(-1)
    keep = e >= 0
    np.add.at(out, (rows[keep], e[keep]), w[keep])
    return out


@register_prefetcher("none")
class NoPrefetch(Prefetcher):
    """Loads on demand only."""


@register_prefetcher("next-layer")
class NextLayer(Prefetcher):
    """Speculative routing: the next layer's router on this layer's MoE input (residual streams change
    little between adjacent layers, so the guess is often right)."""

    name = "next-layer"
    needs_hidden = True

    def bind(self, ctx: PrefetchContext) -> None:
        super().bind(ctx)
        if ctx.routers is None:
            raise ValueError("prefetcher 'next-layer' needs the model's routers and hidden states; the "
                             "simulator replays routing only (use transition or mlp there)")

    def predict(self, c: LayerContext) -> list[tuple[int, list[int]]]:
        t = self.target(c.layer)
        if t is None or c.hidden is None:
            return []

        assert self.ctx.routers is not None
        r = self.ctx.routers[t]
        routing = route(c.hidden, r.weight, r.cfg, r.e_score_correction_bias, top_k=self.m)
        return [(t, sorted(set(routing.indices.reshape(-1).tolist())))]


@register_prefetcher("transition")
class Transition(Prefetcher):
    """EdgeMoE's cross-layer statistics.

    1. Calibration: T[l, e, e'] = tokens that chose e at layer l and e' at layer l+k, row-normalised.
    2. Predict: per token, score[e'] = sum over its experts e of gate weight x T[l, e, e']; take each
       token's top-m and the union over the step's tokens.
    """

    name = "transition"

    def bind(self, ctx: PrefetchContext) -> None:
        super().bind(ctx)
        trace = _calibration(self.name, ctx)
        L, E, k = ctx.num_layers, ctx.num_experts, self.distance
        T = np.zeros((L, E, E))
        ex = trace.experts.astype(np.int64)
        for l in range(L - k):
            a, b = ex[:, l, :], ex[:, l + k, :]
            for i in range(a.shape[1]):
                for j in range(b.shape[1]):
                    ok = (a[:, i] >= 0) & (b[:, j] >= 0)
                    np.add.at(T[l], (a[ok, i], b[ok, j]), 1.0)
        self.table = T / np.maximum(T.sum(-1, keepdims=True), 1.0)

    def predict(self, c: LayerContext) -> list[tuple[int, list[int]]]:
        t = self.target(c.layer)
        if t is None:
            return []
        feats = routing_features(c.experts, c.weights, self.ctx.num_experts)  # [n, E]
        return [(t, self._union_top(feats @ self.table[c.layer]))]


_TRAINED: dict[str, list[torch.nn.Sequential | None]] = {}


@register_prefetcher("mlp")
class MLPPredictor(Prefetcher):
    """A ProMoE-style learned predictor, one small MLP per layer pair (l -> l+k).

    1. Calibration pairs: x = layer l's gate-weighted one-hot routing [E] (with `history`, followed by
       the previous token's routing at layer l+k, [2E]); y = layer l+k's expert set (multi-hot [E]).
    2. Train x -> hidden -> E with binary cross-entropy (Adam, full batch, fixed seed: deterministic).
    3. Predict: per token the top-m logits (with `min_prob`, only those whose sigmoid reaches it:
       a confident guess evicts less), union over the step's tokens.
    """

    name = "mlp"

    def __init__(self, *, distance: int = 1, per_token: int | None = None, hidden: int = 64,
                 epochs: int = 300, lr: float = 1e-2, seed: int = 0, history: bool = False,
                 min_prob: float | None = None) -> None:
        super().__init__(distance=distance, per_token=per_token)
        self.hidden, self.epochs, self.lr, self.seed = hidden, epochs, lr, seed
        self.history, self.min_prob = history, min_prob
        self.last: dict[int, np.ndarray] = {}  # layer -> previous step's routing features [E]

    def bind(self, ctx: PrefetchContext) -> None:
        super().bind(ctx)
        trace = _calibration(self.name, ctx)
        L, E, k = ctx.num_layers, ctx.num_experts, self.distance
        # training is deterministic: reuse the nets of an identical calibration and settings
        memo = hashlib.sha256(trace.experts.tobytes() + trace.weights.tobytes() + trace.seq.tobytes() + repr(
            (trace.experts.shape, k, self.hidden, self.epochs, self.lr, self.seed, self.history)).encode()).hexdigest()
        if memo in _TRAINED:
            self.nets = _TRAINED[memo]
            return
        gen = torch.Generator().manual_seed(self.seed)
        self.nets: list[torch.nn.Sequential | None] = []
        # the previous row of the same sequence (rows are sorted by sequence, then position)
        prev = np.concatenate([[False], trace.seq[1:] == trace.seq[:-1]])
        for l in range(L):
            if l + k >= L:
                self.nets.append(None)
                continue
            x = routing_features(trace.experts[:, l], trace.weights[:, l], E)
            target = routing_features(trace.experts[:, l + k], trace.weights[:, l + k], E)
            if self.history:
                before = np.zeros_like(target)
                before[1:][prev[1:]] = target[:-1][prev[1:]]
                x = np.concatenate([x, before], axis=1)
            with torch.inference_mode(False), torch.enable_grad():
                self.nets.append(self._train(torch.from_numpy(x), torch.from_numpy((target > 0).astype(np.float32)),
                                             gen))
        _TRAINED[memo] = self.nets

    def _train(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.nn.Sequential:
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], self.hidden), torch.nn.ReLU(),
                                  torch.nn.Linear(self.hidden, y.shape[1]))
        with torch.no_grad():
            for p in net.parameters():
                p.requires_grad_(True)
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(p.shape[-1], 1)) ** 0.5)
        # plain Adam written out: torch.optim's import costs seconds and this is all we need
        params = list(net.parameters())
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        b1, b2, eps = 0.9, 0.999, 1e-8
        for step in range(1, self.epochs + 1):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g, mi, vi in zip(params, grads, m, v):
                    mi.mul_(b1).add_(g, alpha=1 - b1)
                    vi.mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (vi / (1 - b2 ** step)).sqrt_().add_(eps)
                    p.addcdiv_(mi, denom, value=-self.lr / (1 - b1 ** step))
        return net.eval()

    def predict(self, c: LayerContext) -> list[tuple[int, list[int]]]:
        E = self.ctx.num_experts
        feats = routing_features(c.experts, c.weights, E)  # [n, E]
        if self.history:
            self.last[c.layer] = feats.mean(0)
        t = self.target(c.layer)
        net = self.nets[c.layer] if t is not None else None
        if net is None or t is None:
            return []
        if self.history:
            before = self.last.get(t, np.zeros(E, dtype=np.float32))
            feats = np.concatenate([feats, np.broadcast_to(before, feats.shape)], axis=1)
        with torch.no_grad():
            logits = net(torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))).numpy()
        if self.min_prob is None:
            return [(t, self._union_top(logits))]
        top = np.argsort(-logits, axis=1, kind="stable")[:, :self.m]
        keep = 1 / (1 + np.exp(-np.take_along_axis(logits, top, axis=1))) >= self.min_prob
        return [(t, sorted(set(top[keep].tolist())))]


def score_predictions(pairs: Sequence[tuple[set[int], set[int]]]) -> tuple[float, float]:
    """(predicted, real) sets -> (precision, recall) over all pairs."""
    tp = sum(len(p & r) for p, r in pairs)
    fp = sum(len(p - r) for p, r in pairs)
    fn = sum(len(r - p) for p, r in pairs)
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1)
