"""Choosing one option per layer: least total time under a memory and a quality budget.

Shapes: L layers, C_l options of layer l, G memory buckets, H quality buckets.

Each layer l has options (time, memory, quality); a choice takes one option per layer, and time,
memory and quality add up over the layers (the cost and quality models make them additive:
docs/planner.md). The problem is a multiple-choice knapsack with two constraints:
    minimise sum_l time_l  subject to  sum_l memory_l <= M,  sum_l quality_l <= Q.
1. small spaces (prod_l C_l <= `exact_limit`): enumerate every choice; exact;
2. large spaces: dynamic programming over (memory, quality) rounded *up* to G x H buckets (the
   knapsack DP MC-MoE's bit allocation also solves), so every choice the DP accepts truly fits; it
   can miss a choice that fits only within a bucket per layer of a budget (memories that are whole
   numbers, such as bytes, use their greatest common divisor as the bucket when that is fine
   enough, and are then exact);
3. back-track the argmin to the options chosen.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Option:
    time: float
    memory: float
    quality: float = 0.0


@dataclass(frozen=True)
class Choice:
    picks: tuple[int, ...]  # option index per layer
    time: float
    memory: float
    quality: float


def _total(options: Sequence[Sequence[Option]], picks: Sequence[int]) -> Choice:
    chosen = [options[l][c] for l, c in enumerate(picks)]
    return Choice(tuple(picks), sum(o.time for o in chosen), sum(o.memory for o in chosen),
                  sum(o.quality for o in chosen))


def _buckets(delta: float, unit: float, n: int) -> int:
    """Buckets a cost above the layer's least takes, rounded up (n = 0: no slack, any excess fails)."""
    if delta <= 0:
        return 0
    if n == 0:
        return 1
    return max(1, math.ceil(delta / unit - 1e-9))


def _grid(options: Sequence[Sequence[Option]], span: float, *, limit: int) -> tuple[float, int] | None:
    """(unit, buckets) when every memory step above a layer's least is a whole number and their gcd
    cuts the span into at most `limit` buckets; None otherwise."""
    deltas = []
    for opts in options:
        lo = min(o.memory for o in opts)
        for o in opts:
            d = o.memory - lo
            if abs(d - round(d)) > 1e-6:
                return None
            if round(d):
                deltas.append(int(round(d)))
    if not deltas or span <= 0:
        return None
    g = math.gcd(*deltas)
    buckets = int(span // g)
    return (float(g), buckets) if buckets <= limit else None


def search_exact(options: Sequence[Sequence[Option]], *, memory: float, quality: float = math.inf) -> Choice | None:
    """Every choice (step 1); ties go to less memory, then less quality cost."""
    best: Choice | None = None
    for picks in itertools.product(*[range(len(o)) for o in options]):
        c = _total(options, picks)
        if c.memory <= memory and c.quality <= quality:
            if best is None or (c.time, c.memory, c.quality) < (best.time, best.memory, best.quality):
                best = c
    return best


def search_dp(options: Sequence[Sequence[Option]], *, memory: float, quality: float = math.inf,
              memory_buckets: int = 2048, quality_buckets: int = 64) -> Choice | None:
    """Steps 2-3: DP over rounded-up memory and quality."""
    L = len(options)
    if L == 0:
        return Choice((), 0.0, 0.0, 0.0)
    # memory is measured from the least any layer can take, so the buckets cover what can vary
    base_m = sum(min(o.memory for o in opts) for opts in options)
    base_q = sum(min(o.quality for o in opts) for opts in options)
    if base_m > memory or base_q > quality:
        return None
    span_m = memory - base_m
    span_q = quality - base_q
    G = memory_buckets if span_m > 0 else 0
    H = quality_buckets if (math.isfinite(span_q) and span_q > 0) else 0
    unit_m = span_m / G if G else 1.0
    grid = _grid(options, span_m, limit=max(memory_buckets, 1 << 16))
    if grid is not None:  # whole-number memories (bytes): exact buckets of their common divisor
        unit_m, G = grid
    unit_q = span_q / H if H else 1.0
    inf = math.inf
    dp = np.full((G + 1, H + 1), inf)
    dp[0, 0] = 0.0
    back = []
    q_limited = math.isfinite(quality)

    def steps(o: Option, opts: Sequence[Option]) -> tuple[int, int]:
        dm = _buckets(o.memory - min(x.memory for x in opts), unit_m, G)
        dq = _buckets(o.quality - min(x.quality for x in opts), unit_q, H) if q_limited else 0
        return dm, dq

    for opts in options:
        new = np.full_like(dp, inf)
        arg = np.zeros(dp.shape, dtype=np.int32)
        for c, o in enumerate(opts):
            dm, dq = steps(o, opts)
            if dm > G or dq > H:
                continue
            cand = np.full_like(dp, inf)
            cand[dm:, dq:] = dp[:G + 1 - dm, :H + 1 - dq] + o.time
            better = cand < new
            new = np.where(better, cand, new)
            arg = np.where(better, c, arg)
        dp = new
        back.append(arg)
    if not np.isfinite(dp).any():
        return None
    g, h = np.unravel_index(int(np.argmin(dp)), dp.shape)
    picks = [0] * L
    for l in range(L - 1, -1, -1):
        c = int(back[l][g, h])
        picks[l] = c
        dm, dq = steps(options[l][c], options[l])
        g, h = g - dm, h - dq
    return _total(options, picks)


def search(options: Sequence[Sequence[Option]], *, memory: float, quality: float = math.inf,
           exact_limit: int = 20000, memory_buckets: int = 2048, quality_buckets: int = 64) -> Choice | None:
    """The least-time choice within both budgets (None when nothing fits): exact on small spaces, DP else."""
    if not all(options):
        raise ValueError("every layer needs at least one option")
    size = math.prod(len(o) for o in options)
    if size <= exact_limit:
        return search_exact(options, memory=memory, quality=quality)
    return search_dp(options, memory=memory, quality=quality, memory_buckets=memory_buckets,
                     quality_buckets=quality_buckets)
