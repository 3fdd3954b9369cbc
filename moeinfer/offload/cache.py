"""The expert cache: bookkeeping of which experts sit in the fast tier, shared by the live model and
the simulator (it holds no tensors; it hands out slot numbers and says what to load).

Shapes: L MoE layers, E experts; a key is (layer, expert); a pool is the whole cache (scope
"global") or one layer's share (scope "layer", AdapMoE's per-layer sizes).

Per visit (one MoE layer of one step, `moeinfer.offload.visits.Visit`):
1. tick the clock t; every needed key is an access for the policy;
2. a key is a hit when resident in the precision wanted (a low-bit copy does not serve a token whose
   gate weight asks for full precision), else a miss;
3. score the prefetcher's prediction for this layer (precision / recall);
4. each miss is either computed where its weights live (CPU assist, when the cost model says so),
   or placed: a free slot of its pool, else the policy's victim among the pool's keys not needed in
   this visit, if the policy admits it; with no slot the expert streams through a transient buffer.
   A policy whose ranks change only at a key's own accesses (LRU, LFU: `heap_rank`) has its victim
   taken from a lazy heap per pool (an entry per rank a resident key had; stale ones are dropped when
   they surface), so an eviction costs O(log slots) instead of ranking every slot: the same victim.
`prefetch` places predicted keys the same way, pinning this visit's keys. Loads are returned in the
order they must be issued; the caller performs them (real I/O, or the simulator's clock).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from moeinfer.offload.config import OffloadError, parse_size
from moeinfer.offload.policies import Belady, CachePolicy, Key
from moeinfer.offload.visits import Visit


@dataclass
class Load:
    """One transfer from the slow tier: into `slot`, or a transient buffer when slot is None."""

    key: Key
    slot: int | None
    low_bit: bool = False
    prefetch: bool = False
    evicted: Key | None = None


@dataclass
class VisitPlan:
    layer: int
    t: int
    hits: dict[int, int]  # expert -> slot
    loads: list[Load]  # demand loads, in issue order
    assisted: list[int]  # experts computed where their weights live
    low_bit: dict[int, bool]  # expert -> served by a low-bit copy


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    demand_loads: int = 0
    transient_loads: int = 0  # misses not admitted to the cache
    assisted: int = 0
    low_bit_loads: int = 0
    prefetch_loads: int = 0
    prefetch_used: int = 0  # prefetched keys that were hit before being evicted
    evictions: int = 0
    warm_loads: int = 0
    bytes_loaded: int = 0  # demand + prefetch (not warm-up)
    visits: int = 0
    pred_tp: int = 0
    pred_fp: int = 0
    pred_fn: int = 0
    layer_hits: list[int] = field(default_factory=list)
    layer_misses: list[int] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    @property
    def precision(self) -> float | None:
        n = self.pred_tp + self.pred_fp
        return self.pred_tp / n if n else None

    @property
    def recall(self) -> float | None:
        n = self.pred_tp + self.pred_fn
        return self.pred_tp / n if n else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hit_rate": self.hit_rate, "precision": self.precision, "recall": self.recall}


AssistRule = Callable[[Key, int], bool]  # (key, tokens) -> compute where the weights live?


class ExpertCache:
    """Fast-tier residency of experts, driven by a `CachePolicy`; see the module docstring."""

    def __init__(self, *, num_layers: int, num_experts: int, capacities: Sequence[int], policy: CachePolicy,
                 expert_bytes: int, low_bit_bytes: int | None = None, low_bit_threshold: float | None = None,
                 assist: AssistRule | None = None) -> None:
        if len(capacities) not in (1, num_layers):
            raise ValueError(f"capacities: one global pool or one per layer ({num_layers}), got {len(capacities)}")
        if min(capacities) < 1:
            raise OffloadError(f"every cache pool needs at least one expert, got sizes {list(capacities)}")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.capacities = list(capacities)
        self.policy = policy
        self.expert_bytes = expert_bytes
        self.low_bit_bytes = low_bit_bytes
        self.low_bit_threshold = low_bit_threshold
        self.assist = assist
        starts = [sum(self.capacities[:i]) for i in range(len(self.capacities))]
        self.free: list[list[int]] = [list(range(s, s + c)) for s, c in zip(starts, self.capacities)]
        self.pool_keys: list[set[Key]] = [set() for _ in self.capacities]
        self.resident: dict[Key, int] = {}
        self.low: dict[Key, bool] = {}
        self.unused_prefetch: set[Key] = set()
        self.predicted: dict[int, set[int]] = {}
        self.pinned: set[Key] = set()
        self.t = -1
        self.rank = policy.heap_rank()
        self.heaps: list[list[tuple[Any, Key]]] = [[] for _ in self.capacities]
        self.stats = CacheStats(layer_hits=[0] * num_layers, layer_misses=[0] * num_layers)

    @property
    def num_slots(self) -> int:
        return sum(self.capacities)

    def pool_of(self, key: Key) -> int:
        return 0 if len(self.capacities) == 1 else key[0]

    def begin_request(self) -> None:
        self.policy.begin_request()

    # -- placement --------------------------------------------------------------------------------
    def _place(self, key: Key, *, low_bit: bool) -> tuple[int | None, Key | None]:
        if key in self.resident:  # a low-bit copy upgraded to full precision in place
            self.low[key] = low_bit
            self.policy.on_insert(key, self.t, low_bit=low_bit)
            self._push(key)
            return self.resident[key], None
        pool = self.pool_of(key)
        evicted = None
        if self.free[pool]:
            slot = self.free[pool].pop(0)
        else:
            victim = self._victim(pool)
            if victim is None or not self.policy.admit(key, victim, self.t):
                return None, None
            slot = self._evict(victim)
            evicted = victim
        self.resident[key] = slot
        self.low[key] = low_bit
        self.pool_keys[pool].add(key)
        self.policy.on_insert(key, self.t, low_bit=low_bit)
        self._push(key)
        return slot, evicted

    def _victim(self, pool: int) -> Key | None:
        """The policy's victim among the pool's unpinned keys (None: every key is pinned)."""
        if self.rank is None:
            cands = sorted(k for k in self.pool_keys[pool] if k not in self.pinned)
            return self.policy.victim(cands, self.t) if cands else None
        heap, keys, held = self.heaps[pool], self.pool_keys[pool], []
        victim = None
        while heap:
            rank, key = heap[0]
            if key not in keys or rank != self.rank(key):  # evicted since, or ranked again since
                heapq.heappop(heap)
            elif key in self.pinned:
                held.append(heapq.heappop(heap))
            else:
                victim = key
                break
        for entry in held:
            heapq.heappush(heap, entry)
        return victim

    def _push(self, key: Key) -> None:
        """Record a resident key's current rank (heap policies); rebuild a heap grown stale."""
        if self.rank is None:
            return
        pool = self.pool_of(key)
        heap = self.heaps[pool]
        heapq.heappush(heap, (self.rank(key), key))
        if len(heap) > 4 * self.capacities[pool] + 64:
            self.heaps[pool] = [(self.rank(k), k) for k in self.pool_keys[pool]]
            heapq.heapify(self.heaps[pool])

    def _evict(self, key: Key) -> int:
        slot = self.resident.pop(key)
        self.low.pop(key, None)
        self.pool_keys[self.pool_of(key)].discard(key)
        self.unused_prefetch.discard(key)
        self.policy.on_evict(key)
        self.stats.evictions += 1
        return slot

    def drop(self, key: Key) -> None:
        """Forget a resident key whose transfer failed (its slot holds garbage): it is loaded again."""
        if key in self.resident:
            slot = self.resident.pop(key)
            self.low.pop(key, None)
            self.pool_keys[self.pool_of(key)].discard(key)
            self.unused_prefetch.discard(key)
            self.policy.on_evict(key)
            self.free[self.pool_of(key)].append(slot)
            self.free[self.pool_of(key)].sort()

    def load_bytes(self, low_bit: bool) -> int:
        return self.low_bit_bytes if low_bit and self.low_bit_bytes is not None else self.expert_bytes

    # -- the two entry points -----------------------------------------------------------------------
    def visit(self, v: Visit) -> VisitPlan:
        """Decide hits, misses and loads of one visit (steps 1-4 of the module docstring)."""
        # 1. clock and accesses
        self.t += 1
        st = self.stats
        st.visits += 1
        if isinstance(self.policy, Belady):
            self.policy.check(self.t, v.layer, v.experts)
        keys = [(v.layer, e) for e in v.experts]
        self.pinned = set(keys)
        wants_low = {e: self.low_bit_threshold is not None and w < self.low_bit_threshold
                     for e, w in zip(v.experts, v.max_weight)}
        for key, w in zip(keys, v.max_weight):
            self.policy.on_access(key, self.t, w)
            if key in self.resident:
                self._push(key)
        # 2. hits and misses
        hits: dict[int, int] = {}
        misses: list[int] = []
        for key in keys:
            e = key[1]
            if key in self.resident and (wants_low[e] or not self.low[key]):
                hits[e] = self.resident[key]
                if key in self.unused_prefetch:
                    self.unused_prefetch.discard(key)
                    st.prefetch_used += 1
            else:
                misses.append(e)
        st.hits += len(hits)
        st.misses += len(misses)
        st.layer_hits[v.layer] += len(hits)
        st.layer_misses[v.layer] += len(misses)
        # 3. prediction quality
        if v.layer in self.predicted:
            pred, real = self.predicted.pop(v.layer), set(v.experts)
            st.pred_tp += len(pred & real)
            st.pred_fp += len(pred - real)
            st.pred_fn += len(real - pred)
        # 4. misses: assist, place or stream
        loads, assisted = [], []
        low_of = {e: bool(self.low.get((v.layer, e), False)) for e in hits}
        tokens = dict(zip(v.experts, v.tokens))
        for e in misses:
            key = (v.layer, e)
            if self.assist is not None and self.assist(key, tokens[e]):
                assisted.append(e)
                st.assisted += 1
                continue
            low = wants_low[e]
            slot, evicted = self._place(key, low_bit=low)
            loads.append(Load(key=key, slot=slot, low_bit=low, evicted=evicted))
            low_of[e] = low
            st.demand_loads += 1
            st.transient_loads += slot is None
            st.low_bit_loads += low
            st.bytes_loaded += self.load_bytes(low)
        return VisitPlan(layer=v.layer, t=self.t, hits=hits, loads=loads, assisted=assisted, low_bit=low_of)

    def prefetch(self, layer: int, experts: Sequence[int]) -> list[Load]:
        """Place predicted experts of `layer` (not yet resident) ahead of their visit, full precision."""
        self.predicted.setdefault(layer, set()).update(int(e) for e in experts)
        loads = []
        for e in experts:
            key = (layer, int(e))
            if key in self.resident:
                continue
            slot, evicted = self._place(key, low_bit=False)
            if slot is None:
                continue
            self.pinned.add(key)  # a later prediction of this batch must not evict it
            self.unused_prefetch.add(key)
            loads.append(Load(key=key, slot=slot, prefetch=True, evicted=evicted))
            self.stats.prefetch_loads += 1
            self.stats.bytes_loaded += self.expert_bytes
        return loads

    def warm(self) -> list[Load]:
        """Fill free slots with the policy's warm keys (static placement) before the first request."""
        loads = []
        for key in self.policy.warm_keys():
            if key in self.resident or not self.free[self.pool_of(key)]:
                continue
            slot, _ = self._place(key, low_bit=False)
            loads.append(Load(key=key, slot=slot))
            self.stats.warm_loads += 1
        return loads


def transient_buffers(pool_sizes: Sequence[int], num_experts: int, *, admits_all: bool = True) -> int:
    """Experts' worth of memory the live cache takes beside its slots for loads that get no slot: one
    (the buffer `OffloadedExperts` streams them through, one at a time) where a pool holds fewer
    experts than a layer has, since a prompt's visit can need every expert of its layer; none
    otherwise when the policy admits every miss (LRU, LFU: each is placed in a slot). A policy that
    refuses newcomers (static: `admits_all=False`) streams some misses at any size."""
    return 1 if min(pool_sizes) < num_experts or not admits_all else 0


def resolve_capacities(size: Any, *, scope: str, num_layers: int, num_experts: int, expert_bytes: int,
                       policy: CachePolicy) -> list[int]:
    """A CacheSize and a scope -> pool sizes: [C] for global, [C_0..C_{L-1}] per layer.

    global: a count is the total; bytes // expert_bytes experts in all.
    layer: a count is experts per layer; bytes are split over the layers (as the policy asks, or evenly).
    A pool never exceeds what it could hold (E per layer, L*E in all).
    """
    size = parse_size(size)
    n = size.resolve(expert_bytes)
    if scope == "global":
        if policy.sets_layer_sizes:
            raise ValueError(f"cache policy {policy.name!r} sets per-layer sizes: use scope='layer'")
        return [min(n, num_layers * num_experts)]
    if size.experts is not None:
        caps = policy.layer_capacities(n * num_layers) or [n] * num_layers
    else:
        if n < num_layers:
            raise OffloadError(f"expert cache of {size} holds {n} experts, fewer than one per layer "
                               f"({num_layers} MoE layers, {expert_bytes:,} bytes per expert)")
        caps = policy.layer_capacities(n) or [n // num_layers] * num_layers
    return [min(c, num_experts) for c in caps]
