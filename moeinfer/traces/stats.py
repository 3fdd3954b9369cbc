"""Summary statistics of a routing trace: expert load, balance, entropy, temporal reuse.

Shapes: N tokens, L MoE layers, K top-k, E experts. S_{t,l} is the set of experts token t chose at
layer l (slots holding -1 are ignored), c[l, e] = |{t : e in S_{t,l}}| the tokens per expert.
The formulas (also in docs/traces.md):

    imbalance[l]        = max_e c[l,e] / mean_e c[l,e]               (1 = perfectly balanced, E = one expert)
    usage_entropy[l]    = -sum_e p[l,e] log2 p[l,e],  p[l,e] = c[l,e] / sum_e c[l,e]   (max log2 E bits)
    router_entropy[l]   = mean_t -sum_e q[t,l,e] log2 q[t,l,e],  q = softmax(router logits)  (needs logits)
    reuse[l]            = mean over tokens t with a predecessor t' (the previous recorded token of the
                          same sequence, by position) of |S_{t,l} & S_{t',l}| / |S_{t,l}|
    distinct[l]         = |{e : c[l,e] > 0}|

Overall values average over layers (imbalance also gives its maximum). Under uniform random
routing reuse is K/E (`reuse_random`), which is what an expert cache of one layer's K experts
would hit with no temporal locality. Temporal expert reuse is the signal expert-offload systems
exploit (MoE-Infinity, Xue et al., 2024; Eliseev & Mazur, 2023, "Fast Inference of MoE LMs with
Offloading").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moeinfer.traces.trace import RoutingTrace, TraceError


def expert_counts(trace: RoutingTrace) -> np.ndarray:
    """Tokens per expert per layer, c [L, E] int64 (a token counts once for each expert it chose)."""
    L, E = trace.num_layers, trace.num_experts
    e = trace.experts.astype(np.int64)  # [N, L, K]
    flat = (np.arange(L)[None, :, None] * E + e)[e >= 0]
    return np.bincount(flat, minlength=L * E).reshape(L, E)


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    """-sum p log2 p over the last axis, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(-1)


def router_entropy_bits(logits: np.ndarray) -> np.ndarray:
    """Mean over tokens of the entropy (bits) of softmax(logits): logits [N, L, E] -> [L]."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    q = np.exp(z)
    q /= q.sum(-1, keepdims=True)
    return _entropy_bits(q).mean(0)


def reuse_rate(trace: RoutingTrace) -> np.ndarray:
    """Per layer, the mean fraction of a token's experts its predecessor (same sequence) also chose [L].

    1. Order the tokens by (seq, pos, step); a token's predecessor is the row before it if that row
       belongs to the same sequence.
    2. For each (token, predecessor) pair and layer count the token's experts found in the
       predecessor's set, ignoring -1 slots, and divide by the token's number of experts.
    3. Average over pairs. NaN where no token has a predecessor.
    """
    # 1. Pairs of consecutive tokens of one sequence.
    step = trace.step if trace.step is not None else np.zeros_like(trace.seq)
    order = np.lexsort((step, trace.pos, trace.seq))
    seq, experts = trace.seq[order], trace.experts[order]
    pair = np.nonzero(seq[1:] == seq[:-1])[0]  # index of the predecessor
    if pair.size == 0:
        return np.full(trace.num_layers, np.nan)
    cur, prev = experts[pair + 1], experts[pair]  # [P, L, K]
    # 2. Overlap of each token's set with its predecessor's.
    hit = ((cur[..., :, None] == prev[..., None, :]) & (cur[..., :, None] >= 0)).any(-1)  # [P, L, K]
    chosen = np.maximum((cur >= 0).sum(-1), 1)  # [P, L]
    # 3. Mean over pairs.
    return (hit.sum(-1) / chosen).mean(0)


def summarize(trace: RoutingTrace) -> dict[str, Any]:
    """Statistics of `trace` as a JSON-ready dict (formulas in the module docstring).

    1. Token counts: total, prompt, generated, sequences.
    2. Load: tokens per expert c [L, E], imbalance and distinct experts per layer.
    3. Entropy in bits: of each layer's expert usage, and of the router softmax (with logits).
    4. Temporal locality: consecutive-token reuse per layer, against the random baseline K/E.
    """
    if trace.num_tokens == 0:
        raise TraceError("the routing trace has no tokens: nothing to summarize")
    E, K = trace.num_experts, trace.top_k
    # 1. Tokens.
    out: dict[str, Any] = {
        "model": trace.meta.get("model"), "model_type": trace.meta.get("model_type"),
        "source": trace.meta.get("source"), "tokens": trace.num_tokens,
        "prompt_tokens": int(trace.is_prompt.sum()), "generated_tokens": int((~trace.is_prompt).sum()),
        "sequences": int(np.unique(trace.seq).size), "layers": trace.layers.tolist(),
        "num_experts": E, "top_k": K}
    # 2. Load.
    counts = expert_counts(trace)
    mean = counts.mean(1)
    imbalance = np.where(mean > 0, counts.max(1) / np.where(mean > 0, mean, 1), np.nan)
    out["tokens_per_expert"] = counts.tolist()
    out["imbalance"] = imbalance.tolist()
    out["imbalance_mean"] = float(np.nanmean(imbalance))
    out["imbalance_max"] = float(np.nanmax(imbalance))
    out["distinct_experts"] = (counts > 0).sum(1).tolist()
    # 3. Entropy.
    usage = _entropy_bits(counts / np.maximum(counts.sum(1, keepdims=True), 1))
    out["max_entropy_bits"] = math.log2(E)
    out["usage_entropy_bits"] = usage.tolist()
    out["usage_entropy_bits_mean"] = float(usage.mean())
    if trace.logits is not None:
        router = router_entropy_bits(trace.logits)
        out["router_entropy_bits"] = router.tolist()
        out["router_entropy_bits_mean"] = float(router.mean())
    else:
        out["router_entropy_bits"] = None
        out["router_entropy_bits_mean"] = None
    # 4. Reuse.
    reuse = reuse_rate(trace)
    out["reuse"] = [None if np.isnan(r) else float(r) for r in reuse]
    out["reuse_mean"] = None if np.isnan(reuse).all() else float(np.nanmean(reuse))
    out["reuse_random"] = K / E
    return out


def format_summary(s: dict[str, Any]) -> str:
    """A human-readable table of `summarize`'s output: totals, then one row per MoE layer."""
    def f(x: float | None, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt)

    lines = [
        f"model: {s['model'] or '?'} ({s['model_type'] or '?'})  source: {s['source'] or '?'}",
        f"tokens: {s['tokens']} ({s['prompt_tokens']} prompt, {s['generated_tokens']} generated) "
        f"in {s['sequences']} sequences; {len(s['layers'])} MoE layers, top-{s['top_k']} of {s['num_experts']}",
        f"load imbalance (max/mean tokens per expert): mean {f(s['imbalance_mean'])}, max {f(s['imbalance_max'])}",
        f"expert-usage entropy: mean {f(s['usage_entropy_bits_mean'])} bits (max {f(s['max_entropy_bits'])})",
        f"router entropy per token: {f(s['router_entropy_bits_mean'])} bits"
        + ("" if s["router_entropy_bits_mean"] is not None else " (no logits in trace)"),
        f"consecutive-token expert reuse: {f(s['reuse_mean'])} (random routing: {f(s['reuse_random'])})",
        "",
        f"{'layer':>5} {'imbal':>6} {'H_use':>6} {'H_rtr':>6} {'reuse':>6} {'used':>4}  tokens per expert",
    ]
    router = s["router_entropy_bits"] or [None] * len(s["layers"])
    for i, layer in enumerate(s["layers"]):
        c = s["tokens_per_expert"][i]
        counts = (" ".join(str(x) for x in c) if len(c) <= 16
                  else f"min {min(c)} median {int(np.median(c))} max {max(c)}")
        lines.append(f"{layer:>5} {f(s['imbalance'][i], '.2f'):>6} {f(s['usage_entropy_bits'][i], '.2f'):>6} "
                     f"{f(router[i], '.2f'):>6} {f(s['reuse'][i], '.3f'):>6} {s['distinct_experts'][i]:>4}  {counts}")
    return "\n".join(lines)
