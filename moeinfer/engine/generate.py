"""Batched generation: left-padded prefill into a preallocated KV cache, then one decode step per
token for the whole batch, stopping rows on eos, stop strings or max_new_tokens.

Shapes: B batch, T prompt length (padded), V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from moeinfer.engine.cpu_decode import prepared_cpu_decode
from moeinfer.engine.sampling import SamplingParams, sample
from moeinfer.engine.static_decode import decode_step
from moeinfer.model.kv_cache import KVCache
from moeinfer.model.transformer import MoEModel

Message = dict[str, str]
Prompt = Union[str, Sequence[int], Sequence[Message]]
TokenCallback = Callable[[int, int, str], None]
"""on_token(row, token_id, text_delta): called for every new token as it is generated."""


@dataclass
class Generation:
    """One prompt's result: the new tokens only, their text, and why generation stopped."""

    token_ids: list[int]
    text: str | None
    finish_reason: str  # "length", "eos" or "stop"
    prompt_token_ids: list[int] = field(default_factory=list)


class _Detokenizer:
    """Incremental text of one row; holds back bytes of an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.text = ""

    def push(self, ids: list[int], *, final: bool = False) -> str:
        if self.tokenizer is None:
            return ""
        full = self.tokenizer.decode(ids)
        if full.endswith("\ufffd") and not final:
            return ""
        delta, self.text = full[len(self.text):], full
        return delta


def encode_prompts(model: MoEModel, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Strings through the tokenizer, message lists through the chat template, ids as they are."""
    tok = model.tokenizer
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str) or (p and isinstance(p[0], dict)):
            if tok is None:
                raise ValueError(f"prompt {i} is text but the model has no tokenizer; pass token ids")
            text = p if isinstance(p, str) else tok.apply_chat_template(list(p))
            ids = tok.encode(text, add_special_tokens=isinstance(p, str))
        else:
            ids = [int(t) for t in p]
            bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside 0..{model.config.vocab_size - 1}: {bad[:5]}")
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        out.append(ids)
    return out


def _eos_ids(model: MoEModel, eos_token_ids: Sequence[int] | None) -> set[int]:
    if eos_token_ids is not None:
        return set(eos_token_ids)
    ids = set(model.config.eos_token_ids)
    if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        ids.add(model.tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate(model: MoEModel, prompts: Sequence[Prompt], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop: Sequence[str] | None = None, eos_token_ids: Sequence[int] | None = None,
             ignore_eos: bool = False, on_token: TokenCallback | None = None) -> list[Generation]:
    """Generate continuations for a batch of prompts (text, chat messages, or token-id lists)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of strings, token-id lists or message lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    prompt_ids = encode_prompts(model, prompts)
    B, T = len(prompt_ids), max(len(p) for p in prompt_ids)
    device = model.device
    if T + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {model.config.max_position_embeddings}")

    # 1. Left-pad the prompts and prefill the cache.
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.full((B, T), pad, dtype=torch.long, device=device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    for b, p in enumerate(prompt_ids):
        ids[b, T - len(p):] = torch.tensor(p, device=device)
        mask[b, T - len(p):] = True
    cache = KVCache(model.config, batch_size=B, max_length=T + max_new_tokens, device=device, dtype=model.dtype)
    logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]  # [B, V]
    decode = decode_step(model, cache)  # a CUDA-graph replay on CUDA when the model allows it

    # 2. Decode one token per step for every unfinished row.
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = set() if ignore_eos else _eos_ids(model, eos_token_ids)
    stops = [s for s in (stop or []) if s]
    out: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    detok = [_Detokenizer(model.tokenizer) for _ in range(B)]
    texts: list[str] = [""] * B
    active_rows: list[bool] = []
    with prepared_cpu_decode(model, cache):  # one-row CPU decode: its forwards run a prepared program
        for step in range(max_new_tokens):
            next_ids = sample(logits, params, generator)  # [B]
            for b, t in enumerate(next_ids.tolist()):
                if reasons[b] is not None:
                    continue
                out[b].append(t)
                if t in eos:
                    reasons[b] = "eos"
                elif len(out[b]) == max_new_tokens:
                    reasons[b] = "length"
                delta = detok[b].push(out[b], final=reasons[b] is not None) if (on_token or stops) else ""
                if stops:
                    texts[b] += delta
                    hit = min((texts[b].find(s) for s in stops if s in texts[b]), default=-1)
                    if hit >= 0:
                        delta = delta[:max(0, len(delta) - (len(texts[b]) - hit))]
                        texts[b] = texts[b][:hit]
                        reasons[b] = "stop"
                if on_token is not None:
                    on_token(b, t, delta)
            if all(r is not None for r in reasons) or step == max_new_tokens - 1:
                break
            # Finished rows keep running (static batch) but their new tokens count as padding (the tensor is
            # made again only when a row finishes).
            running = [r is None for r in reasons]
            if running != active_rows:
                active, active_rows = torch.tensor(running, device=device)[:, None], running  # [B, 1]
            logits = decode(next_ids, active)

    results = []
    for b in range(B):
        text = None
        if model.tokenizer is not None:
            text = texts[b] if reasons[b] == "stop" else model.tokenizer.decode(out[b])
        results.append(Generation(token_ids=out[b], text=text, finish_reason=reasons[b] or "length",
                                  prompt_token_ids=prompt_ids[b]))
    return results
