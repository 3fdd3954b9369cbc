"""Sampling: filters on hand-made logits, seeds, and agreement of the edge cases with greedy."""

from __future__ import annotations

import math

import pytest
import torch

import moeinfer
from hf_peers import save_hf_checkpoint
from moeinfer.engine.sampling import SamplingParams, filter_logits, sample


def test_top_k_keeps_k_best():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isinf(out[0, [0, 3]]).all() and out[0, 1] == 4.0 and out[0, 2] == 3.0


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_logits(probs.log(), top_p=0.7)  # 0.5 < 0.7 <= 0.8: keep the first two
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2:]).all()
    out = filter_logits(probs.log(), top_p=0.5)  # the first alone reaches 0.5
    assert torch.isfinite(out[0, 0]) and torch.isinf(out[0, 1:]).all()


def test_sampling_frequencies_follow_temperature():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = 1/4, 3/4
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, SamplingParams(temperature=1.0), g) for _ in range(4000)])
    assert abs(draws.float().mean().item() - 0.75) < 0.03


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)])
def test_invalid_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m")
    save_hf_checkpoint("qwen3_moe", path)
    return moeinfer.load(path, progress=False)


def test_seeded_sampling_is_reproducible(model):
    a = moeinfer.generate(model, [[1, 2, 3]], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    b = moeinfer.generate(model, [[1, 2, 3]], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    c = moeinfer.generate(model, [[1, 2, 3]], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=8)
    assert a[0].token_ids == b[0].token_ids
    assert a[0].token_ids != c[0].token_ids


def test_top_k_one_is_greedy(model):
    greedy = moeinfer.generate(model, [[4, 5]], max_new_tokens=16, ignore_eos=True)
    topk1 = moeinfer.generate(model, [[4, 5]], max_new_tokens=16, ignore_eos=True, temperature=0.8, top_k=1,
                              seed=1)
    assert greedy[0].token_ids == topk1[0].token_ids


def test_max_new_tokens_and_context_checked(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        moeinfer.generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="context"):
        moeinfer.generate(model, [[1] * 10], max_new_tokens=1000)
    [res] = moeinfer.generate(model, [[1]], max_new_tokens=5, ignore_eos=True)
    assert len(res.token_ids) == 5 and res.finish_reason == "length"
