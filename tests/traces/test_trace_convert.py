"""The Mixtral-8x7B routing-trace converter, on the real traces (shared data) and on made-up lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from moeinfer.cli import main
from moeinfer.traces.trace import RoutingTrace, TraceError
from moeinfer.traces.convert import convert_mixtral
from moeinfer.traces.stats import expert_counts, summarize

DATA = Path(os.environ.get("MOEINFER_MIXTRAL_TRACES", "/work/shared/data/traces/mixtral-8x7b-instruct"))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real Mixtral traces not found at {DATA}")


@needs_data
@pytest.mark.parametrize("name,tokens", [("humaneval", 333), ("gsm8k", 244)])
def test_real_traces_match_readme(name, tokens):
    """Token counts of the README's table; reuse in its 34-40% range; every token has K experts."""
    trace = convert_mixtral(DATA / f"{name}_2_routing.jsonl")
    assert trace.num_tokens == tokens
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (32, 8, 2)
    assert trace.logits is None and not trace.is_prompt.any()
    assert [s["dataset"] for s in trace.meta["sequences"]] == [name, name]
    assert "216e26eb86" in trace.meta["source"] and "Mario928/speculative-moe" in trace.meta["source"]
    assert (expert_counts(trace).sum(1) == tokens * 2).all()
    assert ((trace.experts[..., 0] != trace.experts[..., 1]).all())
    np.testing.assert_allclose(trace.weights.sum(-1), 1.0, atol=1e-4)
    for s in np.unique(trace.seq):  # positions ascend within each sequence
        assert (np.diff(trace.pos[trace.seq == s]) > 0).all()
    summary = summarize(trace)
    assert 0.34 <= summary["reuse_mean"] <= 0.40
    assert summary["reuse_random"] == 0.25


@needs_data
def test_cli_convert_both_files(tmp_path, capsys):
    out = tmp_path / "mixtral.npz"
    files = [str(DATA / f"{n}_2_routing.jsonl") for n in ("gsm8k", "humaneval")]
    assert main(["trace", "convert-mixtral", *files, "--out", str(out)]) == 0
    assert "consecutive-token expert reuse" in capsys.readouterr().out
    trace = RoutingTrace.load(out)
    assert trace.num_tokens == 333 + 244 and np.unique(trace.seq).size == 4
    assert len(trace.meta["files"]) == 2 and trace.meta["tokens_dropped_incomplete"] == 5 + 3


def _line(layer: int, token: int, problem: int = 0, **over) -> str:
    row = {"dataset": "toy", "problem_id": problem, "layer": layer, "experts": [1, 0],
           "gating_probs": [0.75, 0.25], "token_idx": token, **over}
    return json.dumps(row)


def test_incomplete_tokens_dropped_and_sorted(tmp_path):
    f = tmp_path / "toy.jsonl"
    lines = [_line(1, 1), _line(0, 1), _line(0, 0), _line(1, 0), _line(0, 2), _line(0, 0, problem=1),
             _line(1, 0, problem=1)]
    f.write_text("\n".join(lines) + "\n")
    trace = convert_mixtral(f, num_layers=2)
    assert trace.seq.tolist() == [0, 0, 1] and trace.pos.tolist() == [0, 1, 0]
    assert trace.meta["tokens_dropped_incomplete"] == 1
    assert trace.experts[0].tolist() == [[1, 0], [1, 0]]


@pytest.mark.parametrize("line,message", [
    ("{not json", "toy.jsonl:2: not valid JSON"),
    (_line(0, 5, experts=[1, 9]), r"toy.jsonl:2: experts must be ids in 0..7"),
    (_line(0, 5, experts=[1]), "toy.jsonl:2: expected 2 experts"),
    (_line(40, 5), r"toy.jsonl:2: layer must be in 0..31"),
    (json.dumps({"dataset": "toy", "layer": 0}), "toy.jsonl:2: field 'problem_id' must be int"),
    (_line(0, 0), r"toy.jsonl:2: layer 0 of token \('toy', 0, 0\) appears twice"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "toy.jsonl"
    f.write_text(_line(0, 0) + "\n" + line + "\n")
    with pytest.raises(TraceError, match=message):
        convert_mixtral(f)


def test_missing_file_and_no_complete_token(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        convert_mixtral(tmp_path / "nope.jsonl")
    f = tmp_path / "toy.jsonl"
    f.write_text(_line(0, 0) + "\n")
    with pytest.raises(TraceError, match="all 32 layers"):
        convert_mixtral(f)
