"""Expert cache policies (registry): which cached expert to evict, whether to admit a new one.

Keys are (MoE layer position, expert). The cache (`moeinfer.offload.cache.ExpertCache`) asks a policy
for a victim among the evictable keys of the pool that needs room; `admit` can refuse a newcomer
(it is then used once from a transient buffer and not cached). Policies see every access with the
cache's clock `t` (one tick per layer visit), so the live model and the simulator drive them alike.

| name | follows | evicts |
|---|---|---|
| lru | classic | least recently used |
| lfu | classic | least frequently used (all-time counts, LRU on ties) |
| static | Fiddler (Kamahori et al., 2024) | fixed placement of the most popular experts of a calibration profile; never admits a less popular one |
| activation-aware | MoE-Infinity (Xue et al., 2024) | lowest priority from request-level expert activation matrices (EAMs): the current request's EAM is matched to the closest calibration EAM |
| hobbit | HOBBIT (Tang et al., 2024) | lowest weighted sum of recency, frequency and precision (low-bit copies go first) |
| adapmoe | AdapMoE (Zhong et al., 2024) | LRU within per-layer cache sizes chosen from a calibration trace |
| belady | Belady (1966) | the key used farthest in the future (offline optimum; needs the run's own trace) |
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeinfer.offload.errors import OffloadError
from moeinfer.offload.registry import build, calibration_trace
from moeinfer.offload.visits import Visit, all_visits
from moeinfer.traces.stats import expert_counts

Key = tuple[int, int]


@dataclass
class PolicyContext:
    """What a policy may learn from: model shape, a calibration trace, the future (belady)."""

    num_layers: int
    num_experts: int
    calibration: Any = None  # RoutingTrace | None
    future: list[Visit] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class CachePolicy:
    """Base policy: LRU bookkeeping that every policy keeps (recency and all-time frequency)."""

    name = "base"
    sets_layer_sizes = False  # True: layer_capacities() decides per-layer pool sizes (scope "layer" only)

    def __init__(self) -> None:
        self.tick = 0
        self.last: dict[Key, int] = {}
        self.count: dict[Key, int] = defaultdict(int)
        self.low_bit: dict[Key, bool] = {}

    def bind(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    def begin_request(self) -> None:
        """A new request (sequence) starts."""

    def on_access(self, key: Key, t: int, weight: float) -> None:
        self.tick += 1
        self.last[key] = self.tick
        self.count[key] += 1

    def on_insert(self, key: Key, t: int, *, low_bit: bool = False) -> None:
        self.low_bit[key] = low_bit
        if key not in self.last:  # prefetched before its first access
            self.tick += 1
            self.last[key] = self.tick

    def on_evict(self, key: Key) -> None:
        self.low_bit.pop(key, None)

    def victim(self, candidates: Sequence[Key], t: int) -> Key:
        return min(candidates, key=lambda k: (self.last.get(k, 0), k))

    def heap_rank(self) -> Callable[[Key], tuple[Any, ...]] | None:
        """A key's eviction rank (the victim is the least) when `victim` is the minimum of that rank
        and the rank changes only when that key is accessed or inserted (LRU, LFU): the cache then
        keeps the resident keys in a heap instead of ranking every candidate at each eviction.
        None (the default): `victim` is asked with every candidate."""
        return None

    def admit(self, key: Key, victim: Key, t: int) -> bool:
        return True

    def layer_capacities(self, total: int) -> list[int] | None:
        """Per-layer sizes summing to `total` (scope "layer"), or None for an even split."""
        return None

    def warm_keys(self) -> list[Key]:
        """Keys to load before the first request, best first (static placement)."""
        return []


PolicyFactory = Callable[..., CachePolicy]
POLICIES: dict[str, PolicyFactory] = {}


def register_policy(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def deco(cls: PolicyFactory) -> PolicyFactory:
        POLICIES[name] = cls
        return cls
    return deco


def make_policy(name: str, ctx: PolicyContext, **kwargs: Any) -> CachePolicy:
    return build("cache policy", POLICIES, name, ctx, kwargs)


def _need_calibration(name: str, ctx: PolicyContext) -> Any:
    return calibration_trace("cache policy", name, ctx)


def popularity(trace: Any) -> np.ndarray:
    """Tokens per expert per layer of a trace, [L, E] float."""
    return expert_counts(trace).astype(np.float64)


@register_policy("lru")
class LRU(CachePolicy):
    """Evict the least recently used key."""

    name = "lru"

    def rank(self, key: Key) -> tuple[int, Key]:
        return (self.last.get(key, 0), key)

    def victim(self, candidates: Sequence[Key], t: int) -> Key:
        return min(candidates, key=self.rank)

    def heap_rank(self) -> Callable[[Key], tuple[Any, ...]] | None:
        return self.rank if type(self).victim is LRU.victim else None  # a subclass may rank otherwise


@register_policy("lfu")
class LFU(CachePolicy):
    """Evict the key accessed least often (all-time counts), the least recent among equals."""

    name = "lfu"

    def rank(self, key: Key) -> tuple[int, int, Key]:
        return (self.count.get(key, 0), self.last.get(key, 0), key)

    def victim(self, candidates: Sequence[Key], t: int) -> Key:
        return min(candidates, key=self.rank)

    def heap_rank(self) -> Callable[[Key], tuple[Any, ...]] | None:
        return self.rank if type(self).victim is LFU.victim else None


@register_policy("static")
class Static(CachePolicy):
    """Fiddler's placement: the most popular experts of a calibration profile stay; others pass through.

    1. Popularity [L, E] = tokens per expert in the calibration trace.
    2. warm_keys: every key, most popular first (the cache loads as many as fit).
    3. A newcomer is admitted only over a strictly less popular victim, so the placement stays fixed.
    """

    name = "static"

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.pop = popularity(_need_calibration(self.name, ctx))

    def victim(self, candidates: Sequence[Key], t: int) -> Key:
        return min(candidates, key=lambda k: (self.pop[k], k))

    def admit(self, key: Key, victim: Key, t: int) -> bool:
        return bool(self.pop[key] > self.pop[victim])

    def warm_keys(self) -> list[Key]:
        L, E = self.pop.shape
        return sorted(((l, e) for l in range(L) for e in range(E)), key=lambda k: (-self.pop[k], k))


@register_policy("activation-aware")
class ActivationAware(CachePolicy):
    """MoE-Infinity's activation-aware cache.

    1. Calibration: one expert activation matrix (EAM, [L, E] tokens per expert) per request.
    2. During a request, accumulate its EAM; every `rematch_every` accesses match it to the
       calibration EAM with the highest cosine similarity (before the first match: their mean).
    3. Priority of a key = (matched ratio + current ratio) / (layer distance), the ratios being each
       EAM's row-normalised counts and the distance the visits until that layer runs again (1..L),
       so experts needed soon and often stay. Evict the lowest priority (LRU on ties).
    """

    name = "activation-aware"

    def __init__(self, *, rematch_every: int = 8) -> None:
        super().__init__()
        self.rematch_every = rematch_every

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        trace = _need_calibration(self.name, ctx)
        L, E = ctx.num_layers, ctx.num_experts
        eams = []
        for s in np.unique(trace.seq):
            rows = trace.experts[trace.seq == s].astype(np.int64)  # [n, L, K]
            flat = (np.arange(L)[None, :, None] * E + rows)[rows >= 0]
            eams.append(np.bincount(flat, minlength=L * E).reshape(L, E).astype(np.float64))
        self.history = np.stack([self._ratio(m) for m in eams])  # [R, L, E]
        self.begin_request()
        self.current_layer = 0

    @staticmethod
    def _ratio(m: np.ndarray) -> np.ndarray:
        return m / np.maximum(m.sum(-1, keepdims=True), 1.0)

    def begin_request(self) -> None:
        L, E = self.ctx.num_layers, self.ctx.num_experts
        self.eam = np.zeros((L, E))
        self.matched = self.history.mean(0) if hasattr(self, "history") else np.zeros((L, E))
        self.accesses = 0

    def on_access(self, key: Key, t: int, weight: float) -> None:
        super().on_access(key, t, weight)
        self.eam[key] += 1
        self.current_layer = key[0]
        self.accesses += 1
        if self.accesses % self.rematch_every == 0:
            cur = self._ratio(self.eam).reshape(-1)
            hist = self.history.reshape(len(self.history), -1)
            sim = hist @ cur / (np.linalg.norm(hist, axis=1) * max(np.linalg.norm(cur), 1e-12) + 1e-12)
            self.matched = self.history[int(np.argmax(sim))]

    def priority(self, key: Key) -> float:
        L = self.ctx.num_layers
        distance = (key[0] - self.current_layer - 1) % L + 1
        row = self.eam[key[0]]
        current = row[key[1]] / max(row.sum(), 1.0)
        return float(self.matched[key] + current) / distance

    def victim(self, candidates: Sequence[Key], t: int) -> Key:
        return min(candidates, key=lambda k: (self.priority(k), self.last.get(k, 0), k))


@register_policy("hobbit")
class Hobbit(CachePolicy):
    """HOBBIT's multidimensional cache: score = w_r recency + w_f frequency + w_p precision.

    Recency and frequency are each candidate's rank among the candidates scaled to [0, 1]; precision
    is 1 for a full-precision copy, 0 for a low-bit one (cheap to fetch again, so evicted first).
    The lowest score is evicted.
    """

    name = "hobbit"

    def __init__(self, *, w_recency: float = 1.0, w_frequency: float = 1.0, w_precision: float = 0.5) -> None:
        super().__init__()
        if min(w_recency, w_frequency, w_precision) < 0:
            raise ValueError("hobbit weights must be >= 0")
        self.w = (w_recency, w_frequency, w_precision)

    def victim(self, candidates: Sequence[Key], t: int) -> Key:
        n = max(len(candidates) - 1, 1)
        by_last = {k: i / n for i, k in enumerate(sorted(candidates, key=lambda k: (self.last.get(k, 0), k)))}
        by_count = {k: i / n for i, k in enumerate(sorted(candidates, key=lambda k: (self.count.get(k, 0), k)))}
        wr, wf, wp = self.w

        def score(k: Key) -> tuple[float, int, Key]:
            precision = 0.0 if self.low_bit.get(k, False) else 1.0
            return (wr * by_last[k] + wf * by_count[k] + wp * precision, self.last.get(k, 0), k)

        return min(candidates, key=score)


def lru_hits(visits: Sequence[tuple[int, ...]], capacity: int) -> int:
    """Hits of an LRU cache of `capacity` experts over one layer's visits (calibration helper)."""
    order: list[int] = []
    hits = 0
    for experts in visits:
        for e in experts:
            if e in order:
                hits += 1
                order.remove(e)
            order.append(e)
        while len(order) > max(capacity, len(experts)):
            for victim in order:
                if victim not in experts:
                    order.remove(victim)
                    break
            else:
                break
    return hits


@register_policy("adapmoe")
class AdapMoE(CachePolicy):
    """AdapMoE's per-layer cache sizes, LRU within a layer.

    1. For every layer, replay the calibration trace through an LRU cache of 1..E experts.
    2. Dynamic programming over layers picks the sizes (1..E each, summing to the budget) with the
       most calibration hits (LRU's hit curve has cliffs, so one-slot-at-a-time greedy would not do).
    """

    name = "adapmoe"
    sets_layer_sizes = True

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        trace = _need_calibration(self.name, ctx)
        per_layer: list[list[tuple[int, ...]]] = [[] for _ in range(ctx.num_layers)]
        for v in all_visits(trace):
            per_layer[v.layer].append(v.experts)
        E = ctx.num_experts
        self.curve = [[lru_hits(per_layer[l], c) for c in range(E + 1)] for l in range(ctx.num_layers)]

    def layer_capacities(self, total: int) -> list[int]:
        L, E = self.ctx.num_layers, self.ctx.num_experts
        if total < L:
            raise OffloadError(f"adapmoe needs at least one expert per layer: {total} experts for {L} layers")
        total = min(total, L * E)
        # best[l][n]: most calibration hits of layers l.. with n slots among them (each 1..E)
        NEG = -1
        best = [[NEG] * (total + 1) for _ in range(L + 1)]
        choice = [[0] * (total + 1) for _ in range(L)]
        best[L][0] = 0
        for l in range(L - 1, -1, -1):
            for n in range(total + 1):
                for c in range(1, min(E, n) + 1):
                    rest = best[l + 1][n - c]
                    if rest != NEG and self.curve[l][c] + rest > best[l][n]:
                        best[l][n], choice[l][n] = self.curve[l][c] + rest, c
        caps, n = [], total
        for l in range(L):
            caps.append(choice[l][n])
            n -= choice[l][n]
        return caps


@register_policy("belady")
class Belady(CachePolicy):
    """Belady's optimal replacement (with bypass): evict the key whose next use is farthest away.

    Needs the run's own future (`OffloadConfig.future`: its routing trace). The cache clock `t`
    indexes that trace's visits; a run that diverges from it is an error.
    """

    name = "belady"

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        if ctx.future is None:
            raise ValueError("cache policy 'belady' is offline: it needs the run's future routing trace "
                             "(OffloadConfig.future)")
        self.uses: dict[Key, list[int]] = defaultdict(list)
        for t, v in enumerate(ctx.future):
            for e in v.experts:
                self.uses[(v.layer, e)].append(t)
        self.ptr: dict[Key, int] = defaultdict(int)

    def next_use(self, key: Key, t: int) -> float:
        uses, i = self.uses.get(key, []), self.ptr[key]
        while i < len(uses) and uses[i] <= t:
            i += 1
        self.ptr[key] = i
        return uses[i] if i < len(uses) else float("inf")

    def check(self, t: int, layer: int, experts: tuple[int, ...]) -> None:
        fut = self.ctx.future
        assert fut is not None
        if t >= len(fut) or fut[t].layer != layer or fut[t].experts != experts:
            want = f"layer {fut[t].layer} experts {fut[t].experts}" if t < len(fut) else "the end of the trace"
            raise OffloadError(f"belady: visit {t} is layer {layer} experts {experts}, but the future trace "
                               f"has {want}; the run diverged from the trace it was given")

    def victim(self, candidates: Sequence[Key], t: int) -> Key:
        return max(candidates, key=lambda k: (self.next_use(k, t), k))

    def admit(self, key: Key, victim: Key, t: int) -> bool:
        return self.next_use(key, t) < self.next_use(victim, t)
