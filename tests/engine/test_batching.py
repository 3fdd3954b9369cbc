"""Continuous batching: rows at different stages share forwards, and each request gets exactly the
tokens it gets alone."""

from __future__ import annotations

import threading

import pytest
import torch

import moeinfer
from hf_peers import save_hf_checkpoint
from moeinfer.engine.batching import (BatchEngine, EngineRequest, FinishEvent, QueueFull, TokenEvent)
from moeinfer.engine.sampling import SamplingParams
from moeinfer.model.kv_cache import KVCache


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v3"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_hf_checkpoint(request.param, path)
    return moeinfer.load(path, progress=False)


def test_rows_at_different_lengths_decode_like_alone(model):
    """Per-row cache positions: two rows with different histories, decoded in one forward."""
    a, b = [3, 4, 5, 6, 7], [9, 8]
    cache = KVCache(model.config, batch_size=2, max_length=16)
    with torch.no_grad():
        model(torch.tensor([a]), cache=cache.rows(0, 1))
        model(torch.tensor([b]), cache=cache.rows(1, 2))
        step = model(torch.tensor([[11], [12]]), cache=cache)[:, -1]
        ref_a = model(torch.tensor([a + [11]]))[:, -1]
        ref_b = model(torch.tensor([b + [12]]))[:, -1]
    assert cache.lengths.tolist() == [6, 3]
    torch.testing.assert_close(step[0], ref_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1], ref_b[0], atol=1e-5, rtol=1e-5)


def test_move_row_keeps_its_sequence(model):
    cache = KVCache(model.config, batch_size=3, max_length=16)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache.rows(2, 3))
        cache.move_row(2, 0)
        cache.clear_row(2)
        got = model(torch.tensor([[4]]), cache=cache.rows(0, 1))[:, -1]
        ref = model(torch.tensor([[1, 2, 3, 4]]))[:, -1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [4, 0, 0]


def _collect(engine, reqs):
    done = {i: threading.Event() for i in range(len(reqs))}
    results, streamed = {}, {i: [] for i in range(len(reqs))}

    def cb(i):
        def on_event(ev):
            if isinstance(ev, TokenEvent):
                streamed[i].append(ev.token_id)
            elif isinstance(ev, FinishEvent):
                results[i] = ev
                done[i].set()
        return on_event

    for i, r in enumerate(reqs):
        engine.submit(r, cb(i))
    for e in done.values():
        assert e.wait(120)
    return results, streamed


def test_concurrent_requests_equal_solo(model):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (1, 9, 3, 17, 5, 2, 11)]
    lengths = [6, 3, 12, 5, 9, 14, 1]
    engine = BatchEngine(model, max_batch=3, prefill_chunk=4, max_context=64).start()
    try:
        reqs = [EngineRequest(prompt_ids=p, max_new_tokens=n, eos_token_ids=frozenset())
                for p, n in zip(prompts, lengths)]
        results, streamed = _collect(engine, reqs)
    finally:
        engine.stop()
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        alone = moeinfer.generate(model, [p], max_new_tokens=n, ignore_eos=True)[0].token_ids
        assert results[i].token_ids == alone, f"request {i}"
        assert streamed[i] == alone
        assert results[i].finish_reason == "length" and results[i].prompt_tokens == len(p)
    assert engine.stats.requests_finished == len(prompts)


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    req = EngineRequest(prompt_ids=[1, 2, 3], max_new_tokens=10, eos_token_ids=frozenset(),
                        sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=42))
    engine = BatchEngine(model, max_batch=4).start()
    try:
        alone, _ = _collect(engine, [req])
        crowd, _ = _collect(engine, [req, EngineRequest(prompt_ids=[7] * 5, max_new_tokens=10), req])
    finally:
        engine.stop()
    assert alone[0].token_ids == crowd[0].token_ids == crowd[2].token_ids


def test_queue_bound_and_validation(model):
    engine = BatchEngine(model, max_batch=1, max_queue=2, max_context=32)  # not started: nothing drains
    ok = EngineRequest(prompt_ids=[1], max_new_tokens=4)
    engine.submit(ok, lambda ev: None)
    engine.submit(ok, lambda ev: None)
    with pytest.raises(QueueFull):
        engine.submit(ok, lambda ev: None)
    with pytest.raises(ValueError, match="context length of 32"):
        engine.validate(EngineRequest(prompt_ids=[1] * 30, max_new_tokens=4))
    with pytest.raises(ValueError, match="empty"):
        engine.validate(EngineRequest(prompt_ids=[], max_new_tokens=4))
    with pytest.raises(ValueError, match="outside"):
        engine.validate(EngineRequest(prompt_ids=[10**6], max_new_tokens=4))


def test_cancel_frees_the_row(model):
    engine = BatchEngine(model, max_batch=1).start()
    finished = threading.Event()
    reasons = []

    def on_event(ev):
        if isinstance(ev, FinishEvent):
            reasons.append(ev.finish_reason)
            finished.set()

    try:
        h = engine.submit(EngineRequest(prompt_ids=[1, 2], max_new_tokens=200, eos_token_ids=frozenset()),
                          on_event)
        h.cancel()
        assert finished.wait(30)
        results, _ = _collect(engine, [EngineRequest(prompt_ids=[3], max_new_tokens=3)])
    finally:
        engine.stop()
    assert reasons == ["cancelled"]
    assert len(results[0].token_ids) <= 3


def test_expert_faults_mask_and_count(model):
    from moeinfer.engine.faults import ExpertFaults, parse_fault

    faults = ExpertFaults(model)
    layer = model.moe_blocks()[0].layer_idx
    faults.mask(layer, 1)
    with pytest.raises(ValueError, match="does not exist"):
        faults.mask(layer, 99)
    with pytest.raises(ValueError, match="no MoE block"):
        faults.mask(-1, 0)
    with pytest.raises(ValueError, match="LAYER:EXPERT"):
        parse_fault("3-1")
    try:
        out = moeinfer.generate(model, [[1, 2, 3, 4, 5, 6, 7, 8]], max_new_tokens=8, ignore_eos=True)
        assert len(out[0].token_ids) == 8
        assert faults.masked() == [(layer, 1)] and faults.degraded_tokens > 0
    finally:
        model.moe_blocks()[0].gate.available = None
