"""Exactness against the peer implementation, transformers, for every architecture."""

from __future__ import annotations

import pytest
import torch

import moeinfer
from hf_peers import save_hf_checkpoint
from peer_checks import batched_and_alone, greedy_pair, max_logit_diff

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]

# (arch, overrides): awkward shapes and routing corner cases.
CASES = [(a, {}) for a in ARCHS] + [
    ("mixtral", dict(num_local_experts=4, num_experts_per_tok=4)),  # top-k = number of experts
    ("mixtral", dict(num_local_experts=16, num_experts_per_tok=1, hidden_size=36, num_attention_heads=3,
                    num_key_value_heads=1)),  # idle experts, hidden not a multiple of 16
    ("mixtral", dict(sliding_window=5)),
    ("qwen2_moe", dict(decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=True)),
    ("qwen2_moe", dict(mlp_only_layers=[0], num_hidden_layers=3)),
    ("qwen3_moe", dict(num_experts=6, num_experts_per_tok=6)),
    ("olmoe", dict(clip_qkv=0.5, hidden_size=72, num_attention_heads=6, num_key_value_heads=6)),
]


def _ids(case) -> str:
    arch, over = case
    return arch + ("-" + "-".join(f"{k}={v}" for k, v in over.items()) if over else "")


@pytest.fixture(scope="module", params=CASES, ids=[_ids(c) for c in CASES])
def pair(request, tmp_path_factory):
    arch, over = request.param
    path = tmp_path_factory.mktemp(arch)
    hf = save_hf_checkpoint(arch, path, **over)
    ours = moeinfer.load(path, dtype=torch.float32, progress=False)
    return hf, ours


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_logits_match(pair, left):
    hf, ours = pair
    diff = max_logit_diff(hf, ours, left=left)
    assert diff <= 1e-4, f"max |logit diff| = {diff}"


@pytest.mark.parametrize("prompt_len", [1, 7])
def test_greedy_generation_matches(pair, prompt_len):
    ref, got = greedy_pair(*pair, prompt_len)
    assert got == ref


def test_batched_generation_matches_single(pair):
    """Left-padded batch decoding gives each prompt the tokens it gets alone."""
    for batched, alone in batched_and_alone(pair[1]):
        assert batched == alone
