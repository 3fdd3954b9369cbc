"""Expert placement: which ranks hold which experts of each MoE layer, as a data file.

Shapes: W ranks, E experts, L MoE layers, R replicas of one expert.

A `Placement` maps, per MoE layer, every expert to the ranks that hold a replica of it. Tokens of an
expert with R replicas are split evenly across them (as vLLM's EPLB does). Placements are built by a
strategy from the registry below, optionally from a routing profile (expected tokens per expert,
`load [L, E]`), and saved as JSON so they can be computed offline and loaded at start:

    contiguous   expert e on rank floor(e * W / E)        (blocks; E need not divide by W)
    round_robin  expert e on rank e mod W
    balanced     greedy bin-packing of expected load, at most ceil(E/W) experts per rank (Prophet)
    replicated   hot experts get extra replicas under a slot budget per rank, then bin-packing of
                 the replicas (EPLB in vLLM / DeepSeek, Lazarus, FlexMoE)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeinfer.fsutil import atomic_write_text

PLACEMENT_VERSION = 1

Replicas = tuple[tuple[int, ...], ...]
"""Per expert, the ranks holding a replica of it (no rank twice)."""


class PlacementError(ValueError):
    """A placement is malformed or does not fit the model / world it is used with."""


@dataclass(frozen=True)
class Placement:
    """Per MoE layer (model layer index), each expert's replica ranks."""

    num_ranks: int
    num_experts: int
    layers: dict[int, Replicas]
    strategy: str = "custom"
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.num_ranks < 1 or self.num_experts < 1:
            raise PlacementError(f"placement needs num_ranks >= 1 and num_experts >= 1, "
                                 f"got {self.num_ranks} and {self.num_experts}")
        for layer, replicas in self.layers.items():
            where = f"placement layer {layer}"
            if len(replicas) != self.num_experts:
                raise PlacementError(f"{where} lists {len(replicas)} experts, expected {self.num_experts}")
            for e, ranks in enumerate(replicas):
                if not ranks:
                    raise PlacementError(f"{where}: expert {e} has no replica")
                if len(set(ranks)) != len(ranks):
                    raise PlacementError(f"{where}: expert {e} has two replicas on one rank: {list(ranks)}")
                bad = [r for r in ranks if not 0 <= r < self.num_ranks]
                if bad:
                    raise PlacementError(f"{where}: expert {e} is on rank(s) {bad} outside 0..{self.num_ranks - 1}")

    # -- queries ------------------------------------------------------------------------------
    def local_experts(self, layer: int, rank: int) -> list[int]:
        """Experts rank `rank` holds in `layer`, ascending: its local slot order."""
        return [e for e, ranks in enumerate(self._layer(layer)) if rank in ranks]

    def experts_per_rank(self, layer: int) -> list[int]:
        counts = [0] * self.num_ranks
        for ranks in self._layer(layer):
            for r in ranks:
                counts[r] += 1
        return counts

    def max_slots(self) -> int:
        """Most experts any rank holds in any layer (its memory need, in experts per layer)."""
        return max((max(self.experts_per_rank(layer)) for layer in self.layers), default=0)

    def rank_load(self, layer: int, expert_load: Sequence[float] | torch.Tensor) -> list[float]:
        """Expected load per rank [W] from per-expert load [E], split evenly over replicas."""
        load = [0.0] * self.num_ranks
        for e, ranks in enumerate(self._layer(layer)):
            share = float(expert_load[e]) / len(ranks)
            for r in ranks:
                load[r] += share
        return load

    def check(self, *, num_ranks: int, num_experts: int, layers: Sequence[int]) -> None:
        """Raise a PlacementError unless this placement fits that world and model."""
        if self.num_ranks != num_ranks:
            raise PlacementError(f"placement is for {self.num_ranks} ranks, the process group has {num_ranks}")
        if self.num_experts != num_experts:
            raise PlacementError(f"placement is for {self.num_experts} experts, the model has {num_experts}")
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise PlacementError(f"placement has no entry for MoE layer(s) {missing}; it covers "
                                 f"{sorted(self.layers)}")

    def _layer(self, layer: int) -> Replicas:
        if layer not in self.layers:
            raise PlacementError(f"placement has no entry for MoE layer {layer}; it covers {sorted(self.layers)}")
        return self.layers[layer]

    # -- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"version": PLACEMENT_VERSION, "strategy": self.strategy, "num_ranks": self.num_ranks,
                "num_experts": self.num_experts, "info": self.info,
                "layers": {str(layer): [list(r) for r in reps] for layer, reps in sorted(self.layers.items())}}

    @classmethod
    def from_json(cls, data: dict[str, Any], *, source: str = "placement") -> Placement:
        try:
            if data.get("version") != PLACEMENT_VERSION:
                raise PlacementError(f"{source}: version {data.get('version')!r} is not supported "
                                     f"(expected {PLACEMENT_VERSION})")
            layers = {int(k): tuple(tuple(int(r) for r in reps) for reps in v) for k, v in data["layers"].items()}
            return cls(num_ranks=int(data["num_ranks"]), num_experts=int(data["num_experts"]), layers=layers,
                       strategy=str(data.get("strategy", "custom")), info=dict(data.get("info") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, PlacementError):
                raise
            raise PlacementError(f"{source} is not a valid placement file: {e!r}") from e

    def dumps(self) -> str:
        """JSON text with one line per layer (readable, diffable)."""
        data = self.to_json()
        layers = data.pop("layers")
        head = json.dumps(data, indent=1)[:-2]
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in layers.items())
        return f"{head},\n \"layers\": {{\n{body}\n }}\n}}\n"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write JSON atomically (temp file in the same folder, then rename)."""
        return atomic_write_text(path, self.dumps())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Placement:
        path = Path(path)
        if not path.is_file():
            raise PlacementError(f"placement file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlacementError(f"placement file {path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise PlacementError(f"placement file {path} must hold a JSON object")
        return cls.from_json(data, source=f"placement file {path}")


# -- strategies (registry) --------------------------------------------------------------------
StrategyFn = Callable[..., Replicas]
"""strategy(num_ranks=W, num_experts=E, load=[E] floats or None, slots_per_rank=int) -> Replicas."""

STRATEGIES: dict[str, StrategyFn] = {}
NEEDS_LOAD: set[str] = set()


def register_strategy(name: str, *, needs_load: bool = False) -> Callable[[StrategyFn], StrategyFn]:
    def deco(fn: StrategyFn) -> StrategyFn:
        STRATEGIES[name] = fn
        if needs_load:
            NEEDS_LOAD.add(name)
        return fn
    return deco


def get_strategy(name: str) -> StrategyFn:
    if name not in STRATEGIES:
        raise ValueError(f"placement strategy {name!r} is not known; valid: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


@register_strategy("contiguous")
def contiguous(*, num_ranks: int, num_experts: int, load: Sequence[float] | None = None,
               slots_per_rank: int | None = None) -> Replicas:
    return tuple((e * num_ranks // num_experts,) for e in range(num_experts))


@register_strategy("round_robin")
def round_robin(*, num_ranks: int, num_experts: int, load: Sequence[float] | None = None,
                slots_per_rank: int | None = None) -> Replicas:
    return tuple((e % num_ranks,) for e in range(num_experts))


def _pack(items: list[tuple[float, int]], *, num_ranks: int, slots: int) -> list[list[int]]:
    """Longest-processing-time bin packing: heaviest item first onto the least-loaded rank that has a
    free slot and does not hold that expert yet. items: (load, expert). Returns ranks per item order."""
    rank_load = [0.0] * num_ranks
    rank_used = [0] * num_ranks
    holders: dict[int, set[int]] = {}
    placed: dict[int, list[int]] = {}
    for weight, e in sorted(items, key=lambda it: (-it[0], it[1])):
        held = holders.setdefault(e, set())
        free = [r for r in range(num_ranks) if rank_used[r] < slots and r not in held]
        if not free:
            if not held:
                raise PlacementError(f"no free slot left for expert {e}: {slots} slot(s) per rank is too few")
            continue  # an extra replica that does not fit: drop it
        r = min(free, key=lambda q: (rank_load[q], rank_used[q], q))
        rank_load[r] += weight
        rank_used[r] += 1
        held.add(r)
        placed.setdefault(e, []).append(r)
    return [sorted(placed[e]) for e in sorted(placed)]


@register_strategy("balanced", needs_load=True)
def balanced(*, num_ranks: int, num_experts: int, load: Sequence[float] | None = None,
             slots_per_rank: int | None = None) -> Replicas:
    """Prophet-style greedy bin-packing of each expert's expected load, one replica per expert.

    1. sort experts by expected load, heaviest first;
    2. put each on the least-loaded rank that still has a free slot (ceil(E/W) slots per rank, so
       memory stays even).
    """
    assert load is not None
    slots = math.ceil(num_experts / num_ranks)
    packed = _pack([(float(load[e]), e) for e in range(num_experts)], num_ranks=num_ranks, slots=slots)
    return tuple(tuple(r) for r in packed)


@register_strategy("replicated", needs_load=True)
def replicated(*, num_ranks: int, num_experts: int, load: Sequence[float] | None = None,
               slots_per_rank: int | None = None) -> Replicas:
    """EPLB-style replication of hot experts under a memory budget of `slots_per_rank` experts per rank.

    1. budget: W * slots_per_rank expert slots (default ceil(E/W) + 1), at least one per expert;
    2. give each expert one replica, then repeatedly one more to the expert with the highest load per
       replica (never more replicas than ranks) until the slots are used;
    3. bin-pack the replicas (load / R each) heaviest first onto the least-loaded rank with a free slot
       that does not hold that expert yet.
    """
    assert load is not None
    slots = slots_per_rank if slots_per_rank is not None else math.ceil(num_experts / num_ranks) + 1
    total = num_ranks * slots
    if total < num_experts:
        raise PlacementError(f"{slots} expert slot(s) per rank x {num_ranks} ranks cannot hold {num_experts} experts")
    counts = [1] * num_experts
    for _ in range(total - num_experts):
        best = max((e for e in range(num_experts) if counts[e] < num_ranks),
                   key=lambda e: (float(load[e]) / counts[e], -e), default=None)
        if best is None:
            break
        counts[best] += 1
    items = [(float(load[e]) / counts[e], e) for e in range(num_experts) for _ in range(counts[e])]
    packed = _pack(items, num_ranks=num_ranks, slots=slots)
    return tuple(tuple(r) for r in packed)


DEFAULT_SMOOTHING = 0.25
"""Share of each layer's mean load mixed into every expert's load before placing. Traces are short and
expert popularity drifts (between halves of one task, more between tasks): on the held-out halves and
the other task of the Mixtral-8x7B and moeinfer-tiny traces, 0.25 lowered the imbalance of the
replicated placement in 6 of 8 cases (docs/expert-parallel.md); 0 fits the profile exactly."""


def make_placement(strategy: str, *, num_ranks: int, num_experts: int, layers: Sequence[int],
                   load: torch.Tensor | Sequence[Sequence[float]] | None = None,
                   slots_per_rank: int | None = None, smoothing: float = DEFAULT_SMOOTHING,
                   info: dict[str, Any] | None = None) -> Placement:
    """Build a placement for `layers` (model layer indices); `load [L, E]` is expected tokens per expert,
    one row per entry of `layers` (required by balanced and replicated), shrunk toward its layer mean
    by `smoothing` (0 = use as is, 1 = uniform)."""
    if not 0.0 <= smoothing <= 1.0:
        raise PlacementError(f"smoothing must be in [0, 1], got {smoothing}")
    fn = get_strategy(strategy)
    if num_ranks < 1:
        raise PlacementError(f"num_ranks must be >= 1, got {num_ranks}")
    if strategy in NEEDS_LOAD:
        if load is None:
            raise PlacementError(f"placement strategy {strategy!r} needs a routing profile or trace "
                                 "(expected tokens per expert); contiguous and round_robin do not")
        if len(load) != len(layers):
            raise PlacementError(f"routing profile has {len(load)} layer rows, the model has {len(layers)} MoE layers")
        if any(len(row) != num_experts for row in load):
            raise PlacementError(f"routing profile rows must have {num_experts} experts")
    if slots_per_rank is not None and slots_per_rank < math.ceil(num_experts / num_ranks):
        raise PlacementError(f"slots_per_rank={slots_per_rank} is below ceil(E/W) = "
                             f"{math.ceil(num_experts / num_ranks)}: the experts would not fit")
    out: dict[int, Replicas] = {}
    for i, layer in enumerate(layers):
        row = None
        if load is not None:
            raw = [float(v) for v in load[i]]
            mean = sum(raw) / len(raw)
            row = [(1 - smoothing) * v + smoothing * mean for v in raw]
        out[int(layer)] = fn(num_ranks=num_ranks, num_experts=num_experts, load=row, slots_per_rank=slots_per_rank)
    meta = dict(info or {})
    if slots_per_rank is not None:
        meta.setdefault("slots_per_rank", slots_per_rank)
    if strategy in NEEDS_LOAD:
        meta.setdefault("smoothing", smoothing)
    return Placement(num_ranks=num_ranks, num_experts=num_experts, layers=out, strategy=strategy, info=meta)


def slots_for_budget(budget_bytes: int, *, expert_bytes: int, num_layers: int) -> int:
    """Experts per rank and layer that fit a per-rank memory budget for routed experts
    (`expert_bytes`: one expert's weights, e.g. 3 * D * I * dtype bytes)."""
    if expert_bytes <= 0 or num_layers <= 0:
        raise PlacementError("expert_bytes and num_layers must be > 0")
    slots = budget_bytes // (expert_bytes * num_layers)
    if slots < 1:
        raise PlacementError(f"a budget of {budget_bytes / 2**30:.3f} GiB per rank holds no expert of every layer "
                             f"({num_layers} layers x {expert_bytes / 2**20:.3g} MiB per expert)")
    return int(slots)


def imbalance(rank_load: Sequence[float]) -> float:
    """max / mean load over ranks (1.0 = perfect balance; W = everything on one rank)."""
    mean = sum(rank_load) / len(rank_load)
    return max(rank_load) / mean if mean > 0 else 1.0
