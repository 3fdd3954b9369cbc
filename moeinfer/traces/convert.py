"""Convert the public Mixtral-8x7B-Instruct routing traces (jsonl, one line per token and layer)
into a RoutingTrace.

Source data: `Mario928/speculative-moe`, commit 216e26eb86, folder `routing_data_collected/`,
recorded with vLLM (FP8 experts, unquantized router) on HumanEval and GSM8K problems; a copy with
its README lives in shared/data/traces/mixtral-8x7b-instruct/. Each line is

    {"dataset": "humaneval", "problem_id": 0, "layer": 0, "experts": [6, 5],
     "gating_probs": [0.696, 0.304], "token_idx": 0}

The lines hold the generated tokens only (a problem's token count matches its answer, not its
prompt), top-2 experts and their renormalised weights, and no router logits.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moeinfer.traces.trace import RoutingTrace, TraceError

MIXTRAL_SOURCE = {
    "model": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "model_type": "mixtral",
    "source": "github:Mario928/speculative-moe@216e26eb86 routing_data_collected/",
    "recorded_with": "vLLM, FP8 experts, unquantized router (routing of the full-precision model)",
}
_FIELDS = {"dataset": str, "problem_id": int, "layer": int, "experts": list, "gating_probs": list, "token_idx": int}

PathLike = str | os.PathLike[str]


def _read_lines(path: Path, top_k: int, num_layers: int, num_experts: int,
                tokens: dict[tuple[str, int, int], dict[int, tuple[list[int], list[float]]]]) -> None:
    """Parse one jsonl file into tokens[(dataset, problem_id, token_idx)][layer] = (experts, probs)."""
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: not valid JSON ({e.msg})") from e
            for name, typ in _FIELDS.items():
                if not isinstance(row.get(name), typ):
                    raise TraceError(f"{where}: field {name!r} must be {typ.__name__}, got {row.get(name)!r}")
            experts, probs, layer = row["experts"], row["gating_probs"], row["layer"]
            if len(experts) != top_k or len(probs) != top_k:
                raise TraceError(f"{where}: expected {top_k} experts and gating_probs, got {experts} {probs}")
            if not all(isinstance(e, int) and 0 <= e < num_experts for e in experts):
                raise TraceError(f"{where}: experts must be ids in 0..{num_experts - 1}, got {experts}")
            if not 0 <= layer < num_layers:
                raise TraceError(f"{where}: layer must be in 0..{num_layers - 1}, got {layer}")
            key = (row["dataset"], row["problem_id"], row["token_idx"])
            if layer in tokens.setdefault(key, {}):
                raise TraceError(f"{where}: layer {layer} of token {key} appears twice")
            tokens[key][layer] = ([int(e) for e in experts], [float(p) for p in probs])


def convert_mixtral(paths: PathLike | Sequence[PathLike], *, num_layers: int = 32, num_experts: int = 8,
                    top_k: int = 2, source: dict[str, Any] | None = None) -> RoutingTrace:
    """Read Mixtral routing jsonl file(s) into one RoutingTrace.

    1. Parse every line, checking its fields; key it by (dataset, problem_id, token_idx) and layer.
    2. Keep only tokens routed at all `num_layers` layers (the source's README: a few tokens at the
       end of a run miss some layers).
    3. One sequence per (dataset, problem_id), numbered in sorted order; token_idx is the position;
       tokens sorted by (sequence, position). All tokens are generated ones (is_prompt False).
    4. Metadata: the source citation, the files' sha256 and the sequence table.
    """
    paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not paths:
        raise ValueError("convert_mixtral needs at least one jsonl file")
    # 1. Parse.
    tokens: dict[tuple[str, int, int], dict[int, tuple[list[int], list[float]]]] = {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"Mixtral routing trace {path}: no such file")
        _read_lines(path, top_k, num_layers, num_experts, tokens)
    # 2. Complete tokens only.
    keys = sorted(k for k, layers in tokens.items() if len(layers) == num_layers)
    if not keys:
        raise TraceError(f"no token in {[str(p) for p in paths]} has routing for all {num_layers} layers")
    # 3. Sequences and arrays.
    problems = sorted({k[:2] for k in keys})
    seq_of = {p: i for i, p in enumerate(problems)}
    experts = np.array([[tokens[k][l][0] for l in range(num_layers)] for k in keys], dtype=np.int16)
    weights = np.array([[tokens[k][l][1] for l in range(num_layers)] for k in keys], dtype=np.float32)
    # 4. Provenance.
    meta = {**MIXTRAL_SOURCE, **(source or {}),
            "files": [{"name": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in paths],
            "tokens_read": len(tokens), "tokens_dropped_incomplete": len(tokens) - len(keys),
            "sequences": [{"seq": i, "dataset": d, "problem_id": pid} for (d, pid), i in seq_of.items()]}
    return RoutingTrace(experts=experts, weights=weights, seq=[seq_of[k[:2]] for k in keys],
                        pos=[k[2] for k in keys], is_prompt=np.zeros(len(keys), dtype=bool),
                        layers=np.arange(num_layers), num_experts=num_experts, meta=meta)
