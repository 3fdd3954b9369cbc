"""Exactness against the peer implementation, transformers, for every architecture."""

from __future__ import annotations

import pytest
import torch

import moeinfer
from hf_peers import save_hf_checkpoint

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


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    long, short = torch.randint(0, vocab, (11,), generator=g), torch.randint(0, vocab, (6,), generator=g)
    ids = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    ids[0], mask[0] = long, 1
    ids[1, :6], mask[1, :6] = short, 1  # right padding
    return ids, mask


def test_logits_match(pair):
    hf, ours = pair
    ids, mask = _batch(ours.config.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    valid = mask.bool()
    diff = (ref - got)[valid].abs().max().item()
    assert diff <= 1e-4, f"max |logit diff| = {diff}"


def test_left_padded_logits_match(pair):
    hf, ours = pair
    ids, mask = _batch(ours.config.vocab_size)
    ids[1] = torch.cat([ids[1, 6:], ids[1, :6]])
    mask[1] = torch.cat([mask[1, 6:], mask[1, :6]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask)
    diff = (ref - got)[mask.bool()].abs().max().item()
    assert diff <= 1e-4, f"max |logit diff| = {diff}"


@pytest.mark.parametrize("prompt_len", [1, 7])
def test_greedy_generation_matches(pair, prompt_len):
    hf, ours = pair
    prompt = torch.randint(0, ours.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                          min_new_tokens=32, pad_token_id=0)[0, prompt_len:].tolist()
    got = moeinfer.generate(ours, [prompt[0].tolist()], max_new_tokens=32, ignore_eos=True)[0].token_ids
    assert got == ref


def test_batched_generation_matches_single(pair):
    """Left-padded batch decoding gives each prompt the tokens it gets alone."""
    _, ours = pair
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, ours.config.vocab_size, (n,), generator=g).tolist() for n in (9, 2, 5)]
    batch = moeinfer.generate(ours, prompts, max_new_tokens=12, ignore_eos=True)
    for p, res in zip(prompts, batch):
        alone = moeinfer.generate(ours, [p], max_new_tokens=12, ignore_eos=True)[0]
        assert res.token_ids == alone.token_ids
