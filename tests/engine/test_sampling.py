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


# -- numerically safe for every accepted value (issue 14, defect 2) ------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [dict(temperature=1e-300), dict(temperature=1e-40), dict(temperature=3e-39),
                                    dict(temperature=1.0, top_p=1e-300), dict(temperature=1.0, top_p=1e-40),
                                    dict(temperature=1e-30, top_p=1e-300)])
def test_tiny_temperature_and_top_p_are_greedy(kwargs, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 97, generator=g) * 30).to(dtype)
    for _ in range(20):
        got = sample(logits, SamplingParams(**kwargs), g)
        assert torch.equal(got, logits.argmax(-1)), kwargs


def test_small_temperatures_sharpen_without_overflow():
    """Temperatures just above greedy's threshold, on logits far apart: finite, and the best token wins."""
    logits = torch.tensor([[1e4, -1e4, 0.0, 3e4], [-3e38, 3e38, 0.0, 1.0]])
    for t in (1e-38, 1e-20, 1e-3):
        got = sample(logits, SamplingParams(temperature=t), torch.Generator().manual_seed(1))
        assert got.tolist() == [3, 1]


def test_top_p_of_one_token_is_the_best_token_even_below_float_resolution():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]])
    for p in (1e-300, 1e-8, 0.5):
        out = filter_logits(logits, top_p=p)
        assert torch.isfinite(out[0, 1]) and torch.isinf(out[0, [0, 2, 3]]).all()


@pytest.mark.parametrize("kwargs", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                    dict(temperature=-1e-300), dict(top_p=float("nan")), dict(top_p=float("inf"))])
def test_non_finite_params_are_refused(kwargs):
    with pytest.raises(ValueError, match="temperature|top_p"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_cli_refuses_bad_temperature_in_one_line(value, capsys):
    from moeinfer.cli import main

    assert main(["generate", "--temperature", value, "-n", "2", "To be"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"moeinfer generate: error: temperature must be a finite number >= 0, got {float(value)}"


def test_generate_cli_tiny_temperature_is_greedy(capsys):
    from moeinfer.cli import main

    assert main(["generate", "-n", "8", "To be"]) == 0
    greedy = capsys.readouterr()
    for flags in (["--temperature", "1e-300"], ["--temperature", "1", "--top-p", "1e-300"]):
        assert main(["generate", *flags, "-n", "8", "To be"]) == 0
        out = capsys.readouterr()
        assert out.out == greedy.out and "Traceback" not in out.err
