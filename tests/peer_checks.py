"""The checks every architecture's peer test runs against transformers (one copy for all files)."""

from __future__ import annotations

import torch

import moeinfer


def padded_batch(vocab: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 11 and 6 tokens, the short one right- or left-padded: ids and mask [2, 11]."""
    g = torch.Generator().manual_seed(1)
    long, short = torch.randint(0, vocab, (11,), generator=g), torch.randint(0, vocab, (6,), generator=g)
    ids = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    ids[0], mask[0] = long, 1
    cols = slice(5, 11) if left else slice(0, 6)
    ids[1, cols], mask[1, cols] = short, 1
    return ids, mask


def max_logit_diff(hf, ours, *, left: bool) -> float:
    """Max |logit difference| over real tokens of a padded batch; left padding passes HF the positions."""
    ids, mask = padded_batch(ours.config.vocab_size, left=left)
    kwargs = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if left else {}
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, **kwargs).logits
        got = ours(ids, attention_mask=mask)
    return (ref - got)[mask.bool()].abs().max().item()


def greedy_pair(hf, ours, prompt_len: int, n: int = 32) -> tuple[list[int], list[int]]:
    """n greedy tokens from transformers' generate and from moeinfer.generate, same random prompt."""
    prompt = torch.randint(0, ours.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                          min_new_tokens=n, pad_token_id=0)[0, prompt_len:].tolist()
    got = moeinfer.generate(ours, [prompt[0].tolist()], max_new_tokens=n, ignore_eos=True)[0].token_ids
    return ref, got


def batched_and_alone(ours) -> list[tuple[list[int], list[int]]]:
    """(batched, alone) token lists for three prompts of different lengths, 12 greedy tokens each."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, ours.config.vocab_size, (n,), generator=g).tolist() for n in (9, 2, 5)]
    batch = moeinfer.generate(ours, prompts, max_new_tokens=12, ignore_eos=True)
    return [(res.token_ids, moeinfer.generate(ours, [p], max_new_tokens=12, ignore_eos=True)[0].token_ids)
            for p, res in zip(prompts, batch)]
