"""Timings of several calls taken in turn, each priced against a reference timed in the same rounds.

The planner's costs on a model's shapes are sums and differences of timings of separate calls (a
1-layer and a 3-layer model; an experts module on two prompt lengths). Each was the least of a few
runs of its own; on the Intel development VM, whose speed moves up to 2x within minutes, two least
times could come from different phases of the machine, and a difference of two of them moved 2x
between two profiles of one afternoon (the shipped shape's layer / forward split: 0.41 + 0.84 ms
against 0.84 + 0.45 ms; docs/planner.md, fourteenth session). Calls run back to back see one phase,
so (as `decode_experts` already does for decode, in moeinfer/planning/shape_profile.py):
1. rounds, after one warm-up round: per round every call once, in turn (`rounds_in_turn`);
2. per call, the median over the rounds of its time over the reference's time in that round: a
   ratio between neighbours in time, which a machine's drift leaves alone;
3. times the reference's price (`priced_by_reference`): the median of its own times in the rounds
   (or its price from earlier rounds, so figures measured in several sets of rounds share one
   level). The median, not the least: on the Intel VM one to three rounds in 21 ran 1.3-1.7x
   faster for everything at once (a passing fast phase of the machine), so a least time priced
   that phase; the planner benchmark reports the median round (benchmarks/bench_planner.py) and the
   plan-time probe (moeinfer/planning/speed_probe.py) times the reference's median too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def timed(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    """`fn` as a call that returns its own wall time in seconds (synchronized on a GPU)."""
    def call() -> float:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0
    return call


def rounds_in_turn(calls: Sequence[Callable[[], float]], rounds: int) -> list[list[float]]:
    """Step 1: seconds [round][call] of `rounds` rounds (after one warm-up round) of every call in turn;
    each call returns its own time (`timed`, or one that leaves its set-up out)."""
    by_round = [[call() for call in calls] for _ in range(rounds + 1)]
    return by_round[1:]


def priced_by_reference(by_round: Sequence[Sequence[float]], reference: int = 0, *,
                        seconds: float | None = None) -> list[float]:
    """Steps 2-3: per call, the reference's price x the median over the rounds of the call's time over
    the reference's (the reference itself: its price). The price: `seconds` where the reference was
    priced in other rounds already, else the median of its times here."""
    price = statistics.median(row[reference] for row in by_round) if seconds is None else seconds
    return [price * statistics.median(row[i] / row[reference] for row in by_round)
            for i in range(len(by_round[0]))]


def priced_by_shared_reference(sets: Sequence[Sequence[Sequence[float]]],
                               reference: int = 0) -> tuple[list[list[float]], float]:
    """Several sets of rounds (each: `rounds_in_turn` of some calls with the same reference call, one set
    at a time where their calls cannot all be held at once) priced on one level: (per set, its calls'
    prices by `priced_by_reference` at the reference's price; that price, the median of the reference's
    times over every set's rounds)."""
    price = statistics.median(row[reference] for rounds in sets for row in rounds)
    return [priced_by_reference(rounds, reference, seconds=price) for rounds in sets], price
