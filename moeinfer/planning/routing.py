"""Where the planner's routing comes from, and the step groupings it simulates.

Shapes: N tokens, L MoE layers, K top-k, E experts, S sequences.

The cost model replays a routing trace (which experts each token uses, layer by layer):
1. the user's trace (`--trace`, e.g. a real Mixtral routing trace converted by `moeinfer trace`), or
2. the model's own routing on the calibration text (recorded while the quality is measured), or
3. when the model is not loaded (bigger than memory) and no trace is given: uniform random routing,
   which the plan's notes say (real routing is skewed, which caches exploit: the prediction for a
   cache is then pessimistic).
Views of one trace: `batched(trace, B)` runs B sequences in lockstep, one decode step per position;
`prefill(trace)` runs each sequence's tokens in one step; `forwards(trace, rows, step)` groups chosen
rows as given; `split` halves a trace by sequence;
`layers(trace, ids)` keeps some MoE layers (a real 32-layer trace for a model cut to fewer layers).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeinfer.traces.trace import RoutingTrace, record_routing


def _with(trace: RoutingTrace, rows: np.ndarray | slice, step: np.ndarray | None) -> RoutingTrace:
    return RoutingTrace(experts=trace.experts[rows], weights=trace.weights[rows], seq=trace.seq[rows],
                        pos=trace.pos[rows], is_prompt=trace.is_prompt[rows], layers=trace.layers,
                        num_experts=trace.num_experts, logits=None, step=step, meta=dict(trace.meta))


def subset(trace: RoutingTrace, rows: np.ndarray) -> RoutingTrace:
    """The trace's rows `rows` (no step grouping)."""
    return _with(trace, rows, None)


def first_sequences(trace: RoutingTrace, n: int) -> RoutingTrace:
    """The whole sequences that fit in `n` tokens, in order (at least the first sequence's first n)."""
    seqs, counts = np.unique(trace.seq, return_counts=True)
    keep, total = [], 0
    for s, c in zip(seqs, counts):
        if total + c > n and keep:
            break
        keep.append(s)
        total += c
    rows = np.nonzero(np.isin(trace.seq, keep))[0][:n]
    return subset(trace, rows)


def forwards(trace: RoutingTrace, rows: np.ndarray, step: np.ndarray) -> RoutingTrace:
    """The trace's rows `rows` grouped into forwards by `step` (rows with one step id run in one forward,
    in increasing step order): e.g. a benchmark's replay, decode rows one per forward, then a prompt."""
    rows, step = np.asarray(rows), np.asarray(step)
    if rows.shape != step.shape:
        raise ValueError(f"rows {rows.shape} and step {step.shape} must have the same shape")
    return _with(trace, rows, step.astype(np.int32))


def _by_sequence(trace: RoutingTrace) -> tuple[np.ndarray, np.ndarray]:
    """(each row's sequence rank, the rows in (sequence, position) order)."""
    _, rank = np.unique(trace.seq, return_inverse=True)
    return rank, np.lexsort((trace.pos, rank))


def batched(trace: RoutingTrace, batch: int) -> RoutingTrace:
    """Decode at `batch` rows: sequences in groups of `batch`, the group's tokens at one position in one step."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    rank, order = _by_sequence(trace)
    span = int(trace.pos.max()) + 1 if trace.num_tokens else 1
    step = (rank // batch).astype(np.int64) * span + trace.pos
    _, step = np.unique(step[order], return_inverse=True)
    return _with(trace, order, step.astype(np.int32))


def prefill(trace: RoutingTrace) -> RoutingTrace:
    """Each sequence's tokens in one forward (a prompt)."""
    _, rank = np.unique(trace.seq, return_inverse=True)
    return _with(trace, slice(None), rank.astype(np.int32))


def after_decode(trace: RoutingTrace) -> RoutingTrace:
    """Every row decoded one a forward in `batched(trace, 1)`'s order, then each sequence's tokens in one
    forward: the prompts meet the expert cache a generation leaves (a prompt's time: this trace's less
    `batched(trace, 1)`'s, the same steps up to there)."""
    rank, order = _by_sequence(trace)
    n = trace.num_tokens
    step = np.concatenate([np.arange(n), n + rank]).astype(np.int32)
    return _with(trace, np.concatenate([order, np.arange(n)]), step)


def split(trace: RoutingTrace) -> tuple[RoutingTrace, RoutingTrace]:
    """(first half, second half) of the sequences; one sequence -> the same trace twice."""
    seqs = np.unique(trace.seq)
    if len(seqs) < 2:
        return trace, trace
    first = np.isin(trace.seq, seqs[: len(seqs) // 2])
    return _with(trace, first, None), _with(trace, ~first, None)


def layers(trace: RoutingTrace, ids: list[int]) -> RoutingTrace:
    """The trace's MoE layers `ids` (columns, in that order), renumbered 0..len(ids)-1: the routing of
    a model cut to len(ids) layers, e.g. a random-weight Mixtral-shaped model with 2 layers replaying
    two layers of the real Mixtral-8x7B routing."""
    L = trace.num_layers
    bad = [i for i in ids if not 0 <= i < L]
    if not ids or bad:
        raise ValueError(f"layers {list(ids)}: the trace has MoE layers 0..{L - 1}" + (f" (not {bad})" if bad else ""))
    cols = np.asarray(ids, dtype=np.int64)
    return RoutingTrace(experts=trace.experts[:, cols], weights=trace.weights[:, cols], seq=trace.seq, pos=trace.pos,
                        is_prompt=trace.is_prompt, layers=np.arange(len(ids)), num_experts=trace.num_experts,
                        logits=None, step=trace.step, meta={**trace.meta, "layers_kept": [int(i) for i in ids]})


def uniform(*, num_layers: int, num_experts: int, top_k: int, sequences: int = 8, tokens: int = 32,
            seed: int = 0) -> RoutingTrace:
    """Step 3: uniform random routing (K distinct experts per token and layer, equal weights)."""
    rng = np.random.default_rng(seed)
    n = sequences * tokens
    experts = np.argsort(rng.random((n, num_layers, num_experts)), axis=-1)[..., :top_k].astype(np.int16)
    return RoutingTrace(experts=experts, weights=np.full((n, num_layers, top_k), 1.0 / top_k, np.float32),
                        seq=np.repeat(np.arange(sequences), tokens), pos=np.tile(np.arange(tokens), sequences),
                        is_prompt=np.zeros(n, bool), layers=np.arange(num_layers), num_experts=num_experts,
                        meta={"source": "uniform random routing (assumed)"})


def record(model: Any, ids: list[int], *, sequences: int = 8, tokens: int = 64) -> RoutingTrace:
    """Step 2: the model's routing on `sequences` consecutive windows of `tokens` token ids."""
    import torch

    tokens = min(tokens, model.config.max_position_embeddings, max(2, len(ids) // max(1, sequences)))
    rows = [ids[i * tokens:(i + 1) * tokens] for i in range(sequences) if len(ids) >= (i + 1) * tokens]
    if not rows:
        raise ValueError(f"the calibration text has {len(ids)} tokens: too short to record routing")
    with record_routing(model, logits=False, meta={"source": "calibration text"}) as rec, torch.inference_mode():
        model(torch.tensor(rows, device=model.device))
    return rec.trace()
