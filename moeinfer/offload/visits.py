"""Layer visits: the unit of work of the expert cache, taken from a routing trace or a live forward.

Shapes: N trace tokens, L MoE layers, K top-k, E experts.

A *step* is one forward call (the tokens routed together: a prefill, or one decode token per row);
a *visit* is one MoE layer of one step: the sorted set of experts its tokens need, with the tokens
per expert and the largest gate weight per expert. The live model (`OffloadedExperts`) and the
simulator both turn their input into visits and feed them to the same `ExpertCache`, so they make
the same decisions. Steps come from the trace's `step` array when it has one (a `moeinfer trace`
recording), else every row is its own step (batch-1 decode, as in the Mixtral traces).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from moeinfer.traces.trace import RoutingTrace


@dataclass(frozen=True)
class Visit:
    """One MoE layer of one step."""

    layer: int  # MoE layer position 0..L-1
    experts: tuple[int, ...]  # sorted, unique
    tokens: tuple[int, ...]  # tokens routed to each expert
    max_weight: tuple[float, ...]  # largest gate weight of each expert over its tokens


@dataclass(frozen=True)
class Step:
    """Trace rows routed together; `new_request` when they start new sequences."""

    rows: np.ndarray  # [n] row indices into the trace
    new_request: bool
    sequences: int = 1  # sequences the rows belong to (the LM head runs for each one's last position)


def trace_steps(trace: RoutingTrace) -> list[Step]:
    """Group the trace's rows into steps, in execution order.

    1. With `step`: rows sharing a step value ran together, steps run in increasing order.
    2. Without: each row is a step, in row order (sorted by sequence, then position).
    3. A step starts a request when it has a row of a sequence not seen before.
    """
    if trace.step is not None:
        order = np.argsort(trace.step, kind="stable")
        values, starts = np.unique(trace.step[order], return_index=True)
        groups = np.split(order, starts[1:]) if len(values) else []
    else:
        groups = [np.array([i]) for i in range(trace.num_tokens)]
    seen: set[int] = set()
    steps = []
    for rows in groups:
        seqs = set(trace.seq[rows].tolist())
        steps.append(Step(rows=rows, new_request=bool(seqs - seen), sequences=len(seqs)))
        seen |= seqs
    return steps


# a visit of at most this many token-slots (a decode step's) is counted in plain Python: numpy's
# per-call overhead (unique, then two masks per expert) cost ~25 us a layer on a one-token step
SMALL_VISIT = 32


def visit_of(layer: int, experts: np.ndarray, weights: np.ndarray) -> Visit:
    """experts [n, K] (-1 = unused slot) and weights [n, K] of one layer -> its Visit."""
    if experts.size <= SMALL_VISIT:
        return _small_visit(layer, experts, weights)
    e = experts.reshape(-1).astype(np.int64)
    w = weights.reshape(-1).astype(np.float64)
    keep = e >= 0
    e, w = e[keep], w[keep]
    ids = np.unique(e)
    tokens = tuple(int((e == i).sum()) for i in ids)
    maxw = tuple(float(w[e == i].max()) for i in ids)
    return Visit(layer=layer, experts=tuple(int(i) for i in ids), tokens=tokens, max_weight=maxw)


def _small_visit(layer: int, experts: np.ndarray, weights: np.ndarray) -> Visit:
    """`visit_of` for a few token-slots: the same Visit, counted in a dict."""
    seen: dict[int, tuple[int, float]] = {}
    for i, wt in zip(experts.reshape(-1).tolist(), weights.reshape(-1).astype(np.float64).tolist()):
        if i >= 0:
            n, top = seen.get(i, (0, wt))
            seen[i] = (n + 1, wt if wt > top or wt != wt else top)  # a NaN stays, as numpy's max keeps it
    ids = sorted(seen)
    return Visit(layer=layer, experts=tuple(ids), tokens=tuple(seen[i][0] for i in ids),
                 max_weight=tuple(seen[i][1] for i in ids))


def step_visits(trace: RoutingTrace, step: Step) -> Iterator[Visit]:
    """The L visits of one step, layer by layer."""
    for layer in range(trace.num_layers):
        yield visit_of(layer, trace.experts[step.rows, layer], trace.weights[step.rows, layer])


def planned_steps(trace: RoutingTrace) -> list[tuple[Step, list[Visit]]]:
    """Every step with its visits, computed once per trace object (the simulator replays a trace many
    times; the cache is keyed by the arrays' identity, so replacing an array recomputes it)."""
    key = (id(trace.experts), id(trace.weights), id(trace.step))
    cached = getattr(trace, "_planned_steps", None)
    if cached is None or cached[0] != key:
        cached = (key, [(s, list(step_visits(trace, s))) for s in trace_steps(trace)])
        trace._planned_steps = cached  # type: ignore[attr-defined]
    return cached[1]


def all_visits(trace: RoutingTrace) -> list[Visit]:
    """Every visit of the trace in execution order (the future the belady policy reads)."""
    return [v for s in trace_steps(trace) for v in step_visits(trace, s)]
