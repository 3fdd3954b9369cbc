"""Routing traces: recording during generate, the .npz format, statistics, the `trace` CLI."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

import moeinfer
from hf_peers import save_hf_checkpoint
from moeinfer.cli import main
from moeinfer.traces.trace import RoutingTrace, TraceError, record_routing
from moeinfer.traces.stats import format_summary, summarize
from tiny_tokenizer import write_tokenizer

MAX_NEW = 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace")
    save_hf_checkpoint("mixtral", path, vocab_size=300, num_hidden_layers=3)
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return moeinfer.load(ckpt, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def prompts(model):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (9, 2, 5)]


def _eos_for_early_stop(model, prompts) -> tuple[int, int, int]:
    """(row, eos id, n): a token that row `row` generates as its n-th token and no other row generates."""
    free = moeinfer.generate(model, prompts, max_new_tokens=MAX_NEW, ignore_eos=True)
    for b, res in enumerate(free):
        others = {t for c, r in enumerate(free) if c != b for t in r.token_ids}
        for i, t in enumerate(res.token_ids[:MAX_NEW - 2]):
            if t not in others and t not in res.token_ids[:i]:
                return b, t, i + 1
    pytest.skip("no token suited to stop one row early")


@pytest.fixture(scope="module")
def recorded(model, prompts):
    """A batched generate (left padding; one row stopped early by eos) with routing recorded."""
    row, eos, n = _eos_for_early_stop(model, prompts)
    with record_routing(model) as rec:
        results = moeinfer.generate(model, prompts, max_new_tokens=MAX_NEW, eos_token_ids=[eos])
    assert results[row].finish_reason == "eos" and len(results[row].token_ids) == n
    assert any(r.finish_reason == "length" for r in results)
    return results, rec.trace()


def test_observers_detached_on_exit(model, recorded):
    assert model.token_observer is None
    assert all(b.observer is None for b in model.moe_blocks())


def test_records_real_tokens_only(prompts, recorded):
    results, trace = recorded
    # A generated token is routed when it is fed back; the last one of each row never is.
    expected = sum(len(p) + len(r.token_ids) - 1 for p, r in zip(prompts, results))
    assert trace.num_tokens == expected
    assert trace.layers.tolist() == [0, 1, 2] and trace.top_k == 2 and trace.num_experts == 8
    for b, (p, r) in enumerate(zip(prompts, results)):
        mine = trace.seq == b
        assert trace.pos[mine].tolist() == list(range(len(p) + len(r.token_ids) - 1))
        assert trace.is_prompt[mine].tolist() == [True] * len(p) + [False] * (len(r.token_ids) - 1)
    assert trace.step is not None and trace.step[trace.is_prompt].max() == 0


def test_routing_matches_each_prompt_alone(model, prompts, recorded):
    """The batch's recorded routing of prompt b = the router's choice when b's tokens run alone."""
    results, trace = recorded
    for b, (p, r) in enumerate(zip(prompts, results)):
        with record_routing(model) as rec, torch.no_grad():
            model(torch.tensor([p + r.token_ids[:-1]]))
        alone, mine = rec.trace(), trace.seq == b
        assert alone.num_tokens == mine.sum()
        np.testing.assert_array_equal(trace.experts[mine], alone.experts)
        np.testing.assert_allclose(trace.weights[mine], alone.weights, atol=1e-5)
        np.testing.assert_allclose(trace.logits[mine].astype(np.float32), alone.logits.astype(np.float32),
                                   atol=2e-3, rtol=2e-3)


def test_without_logits_and_chained_observer(model, prompts):
    seen: list[int] = []
    block = model.moe_blocks()[0]
    block.observer = lambda layer, routing: seen.append(routing.indices.shape[0])
    try:
        with record_routing(model, logits=False) as rec:
            moeinfer.generate(model, prompts[:2], max_new_tokens=2, ignore_eos=True)
        assert block.observer is not None and model.token_observer is None
    finally:
        block.observer = None
    trace = rec.trace()
    assert trace.logits is None
    assert trace.num_tokens == sum(len(p) + 1 for p in prompts[:2])
    assert seen == [2 * 9, 2]  # the earlier observer still sees every token, padding included


def test_save_load_round_trip(recorded, tmp_path):
    _, trace = recorded
    path = trace.save(tmp_path / "t.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temp file left behind
    back = RoutingTrace.load(path)
    for name in ("experts", "weights", "seq", "pos", "is_prompt", "layers", "logits", "step"):
        a, b = getattr(trace, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert back.num_experts == trace.num_experts and back.meta == trace.meta
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
    assert meta["format"] == "moeinfer-routing-trace" and meta["version"] == 1 and meta["top_k"] == 2


def test_load_errors(recorded, tmp_path):
    _, trace = recorded
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        RoutingTrace.load(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(TraceError, match="bad.npz is not a readable .npz"):
        RoutingTrace.load(bad)
    good = trace.save(tmp_path / "good.npz")
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in arrays.items() if k != "experts"})
    with pytest.raises(TraceError, match=r"missing.npz lacks array\(s\) \['experts'\]"):
        RoutingTrace.load(tmp_path / "missing.npz")
    meta = json.loads(str(arrays["meta"]))
    np.savez(tmp_path / "v2.npz", **{**arrays, "meta": np.array(json.dumps({**meta, "version": 2}))})
    with pytest.raises(TraceError, match="v2.npz: format version 2, this moeinfer reads version 1"):
        RoutingTrace.load(tmp_path / "v2.npz")
    np.savez(tmp_path / "shape.npz", **{**arrays, "pos": arrays["pos"][:-1]})
    with pytest.raises(TraceError, match="shape.npz: pos has shape"):
        RoutingTrace.load(tmp_path / "shape.npz")
    # Truncated file: the zip directory is gone.
    data = good.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="cut.npz is not a readable"):
        RoutingTrace.load(tmp_path / "cut.npz")
    assert zipfile.is_zipfile(good)


def _hand_trace() -> RoutingTrace:
    """E=4, K=2, two layers. Rows are out of order and sequences interleave on purpose.

    seq 0: pos0 {0,1}, pos1 {0,2}, pos2 {0,2}; seq 1: pos0 {1,3}      (layer 0)
    every token {0,1}                                                  (layer 1)
    """
    layer0 = {(0, 0): [0, 1], (0, 1): [0, 2], (0, 2): [2, 0], (1, 0): [1, 3]}
    keys = [(0, 2), (1, 0), (0, 0), (0, 1)]
    experts = [[layer0[k], [1, 0]] for k in keys]
    logits = np.zeros((4, 2, 4))
    logits[[0, 1], :, 0] = 60.0  # two near one-hot tokens (~0 bits), two uniform ones (2 bits)
    return RoutingTrace(experts=experts, weights=np.full((4, 2, 2), 0.5), seq=[k[0] for k in keys],
                        pos=[k[1] for k in keys], is_prompt=[False, True, True, False], layers=[1, 3],
                        num_experts=4, logits=logits, meta={"model": "hand"})


def test_summary_known_answers():
    s = summarize(_hand_trace())
    assert s["tokens"] == 4 and s["sequences"] == 2 and s["prompt_tokens"] == 2
    assert s["tokens_per_expert"] == [[3, 2, 2, 1], [4, 4, 0, 0]]
    assert s["imbalance"] == pytest.approx([3 / 2, 4 / 2])
    assert s["imbalance_mean"] == pytest.approx(1.75) and s["imbalance_max"] == pytest.approx(2.0)
    p = np.array([3, 2, 2, 1]) / 8
    assert s["usage_entropy_bits"] == pytest.approx([-(p * np.log2(p)).sum(), 1.0])
    assert s["max_entropy_bits"] == 2.0
    assert s["router_entropy_bits"] == pytest.approx([1.0, 1.0], abs=1e-6)
    # seq 0 at layer 0: pos1 keeps 1 of 2 experts of pos0, pos2 keeps both; seq 1 has no pair.
    assert s["reuse"] == pytest.approx([0.75, 1.0]) and s["reuse_mean"] == pytest.approx(0.875)
    assert s["reuse_random"] == 0.5
    assert s["distinct_experts"] == [4, 2]
    text = format_summary(s)
    assert "hand" in text and "0.875" in text and "3 2 2 1" in text
    json.dumps(s)  # JSON-ready


def test_summary_unused_slots_and_no_logits():
    """-1 slots (a layer that chose fewer experts) are ignored in counts and reuse."""
    t = RoutingTrace(experts=[[[0, -1]], [[0, 1]]], weights=[[[1, 0]], [[0.5, 0.5]]], seq=[0, 0], pos=[0, 1],
                     is_prompt=[True, False], layers=[0], num_experts=2)
    s = summarize(t)
    assert s["tokens_per_expert"] == [[2, 1]] and s["reuse"] == [0.5]
    assert s["router_entropy_bits"] is None and "no logits" in format_summary(s)
    with pytest.raises(TraceError, match="no tokens"):
        summarize(RoutingTrace(experts=np.zeros((0, 1, 2)), weights=np.zeros((0, 1, 2)), seq=[], pos=[],
                               is_prompt=[], layers=[0], num_experts=2))


def test_bad_arrays_name_the_field():
    with pytest.raises(TraceError, match="weights has shape"):
        RoutingTrace(experts=np.zeros((2, 1, 2)), weights=np.zeros((2, 1, 3)), seq=[0, 0], pos=[0, 1],
                     is_prompt=[True, True], layers=[0], num_experts=4)
    with pytest.raises(TraceError, match="outside -1..3"):
        RoutingTrace(experts=np.full((1, 1, 2), 4), weights=np.zeros((1, 1, 2)), seq=[0], pos=[0],
                     is_prompt=[True], layers=[0], num_experts=4)


def test_recorder_needs_the_model_forward(model):
    x = torch.randn(3, model.config.hidden_size)
    with record_routing(model) as rec, torch.no_grad():
        model(torch.tensor([[1, 2]]))
        with pytest.raises(RuntimeError, match="outside MoEModel.forward"):
            model.moe_blocks()[0](x)
    assert rec.trace().num_tokens == 2


def test_cli_records_and_summarizes(ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("to be or not\n\nwhether 'tis nobler\ndef main():\n")
    out = tmp_path / "run.npz"
    assert main(["trace", "-m", str(ckpt), "--prompts", str(prompts), "-n", "4", "--batch-size", "2",
                 "--out", str(out)]) == 0
    assert "consecutive-token expert reuse" in capsys.readouterr().out
    trace = RoutingTrace.load(out)
    assert sorted(set(trace.seq.tolist())) == [0, 1, 2] and trace.logits is not None
    assert trace.meta["prompts_file"] == str(prompts)

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": [1, 2, 3]}) + "\n" + json.dumps({"prompt": "to be"}) + "\n")
    assert main(["trace", "-m", str(ckpt), "-p", str(jsonl), "-n", "3", "--no-logits", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["trace", "summary", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["sequences"] == 2 and s["router_entropy_bits"] is None
    tok = moeinfer.load(ckpt, progress=False).tokenizer
    assert s["prompt_tokens"] == 3 + len(tok.encode("to be", add_special_tokens=True))
    assert 0 < s["generated_tokens"] <= 2 * (3 - 1)  # eos may stop a row early


def test_cli_errors_and_help(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_text("not a trace")
    assert main(["trace", "summary", str(bad)]) == 1
    assert "bad.npz is not a readable .npz" in capsys.readouterr().err
    assert main(["trace", "-m", str(ckpt)]) == 1
    assert "--prompts" in capsys.readouterr().err
    for cmd in (["trace"], ["trace", "summary"], ["trace", "convert-mixtral"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "convert-mixtral" in out and "summary" in out and "jsonl" in out

