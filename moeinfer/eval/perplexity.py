"""Held-out cross-entropy of a causal LM over a text: bits per byte and perplexity per token.

Shapes: W windows in a batch, C context (tokens per window), V vocab.

The yardstick every optimisation is judged by (quantization, pruning, dynamic top-k, offload...):
the same text, the same windows, one number that does not depend on the tokenizer.

Steps (sliding window, as in the transformers perplexity guide and GPT-2's evaluations):
1. tokenize the whole text once (with the tokenizer's BOS, prepended if its post-processor does not
   add one, so the first real token is scored too);
2. cut windows of `context` tokens starting every `stride` tokens; a window scores only the targets
   no earlier window scored, so every token after the first is scored exactly once and, past the
   first window, with at least `context - stride` tokens of left context;
3. run the windows in batches of `batch_size` (the last, shorter window is right-padded: causal
   attention keeps padding out of real positions), summing -log p(target) in fp32 nats;
4. bits per byte = total nats / ln 2 / UTF-8 bytes of the text; perplexity = exp(nats / tokens).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moeinfer.eval.datasets import DATASETS, EvalText, load_dataset
from moeinfer.model.transformer import MoEModel


@dataclass(frozen=True)
class EvalResult:
    """Cross-entropy of one model on one text; `nats` summed over `tokens` scored targets."""

    name: str
    bits_per_byte: float
    perplexity: float
    bits_per_token: float
    nats: float
    tokens: int
    bytes: int
    context: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.name}: {self.bits_per_byte:.4f} bits/byte, perplexity {self.perplexity:.3f} "
                f"({self.bits_per_token:.4f} bits/token; {self.tokens:,} tokens, {self.bytes:,} bytes; "
                f"context {self.context}, stride {self.stride})")


def as_eval_text(text_or_dataset: str | os.PathLike[str] | EvalText) -> EvalText:
    """A dataset name, an existing file or folder (path or str), an EvalText, or else the text itself."""
    if isinstance(text_or_dataset, EvalText):
        return text_or_dataset
    if isinstance(text_or_dataset, os.PathLike):
        return load_dataset(text_or_dataset)
    if not isinstance(text_or_dataset, str):
        raise TypeError(f"evaluate() takes a text, dataset name, path or EvalText, got {type(text_or_dataset).__name__}")
    if text_or_dataset in DATASETS:
        return load_dataset(text_or_dataset)
    if "\n" not in text_or_dataset and len(text_or_dataset) < 4096 and os.path.exists(text_or_dataset):
        return load_dataset(text_or_dataset)
    return EvalText("text", text_or_dataset, "argument")


def window_spans(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window; positions are token indices, target at p is
    predicted from the window's tokens before p. Together the windows score positions 1..n-1 once."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context - 1:
        raise ValueError(f"stride must be between 1 and context-1 = {context - 1}, got {stride}")
    spans = []
    scored_to = 1  # next position not yet scored
    begin = 0
    while scored_to < num_tokens:
        end = min(begin + context, num_tokens)
        spans.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        begin += stride
    return spans


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


@torch.inference_mode()
def evaluate(model: MoEModel, text_or_dataset: str | os.PathLike[str] | EvalText, *,
             context: int | None = None, stride: int | None = None, batch_size: int = 8,
             tokenizer: Any = None, max_bytes: int | None = None, progress: bool = True) -> EvalResult:
    """Bits per byte and perplexity of `model` on a text, dataset name ("english", "python"), file or folder.

    context: tokens per window (default: the model's max_position_embeddings, at most 1024);
    stride: step between windows (default: context // 2); max_bytes: evaluate only the text's first
    `max_bytes` UTF-8 bytes (cut at a character boundary), for quick runs.
    """
    data = as_eval_text(text_or_dataset)
    tok = tokenizer if tokenizer is not None else model.tokenizer
    if tok is None:
        raise ValueError("evaluate() needs a tokenizer: the model has none; pass tokenizer=")
    text = data.text
    if max_bytes is not None:
        text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    n_bytes = len(text.encode("utf-8"))
    if n_bytes == 0:
        raise ValueError(f"{data.name}: nothing to evaluate (empty text)")
    context = context or min(model.config.max_position_embeddings, 1024)
    stride = stride or max(1, context // 2)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    # 1. tokenize once
    ids = torch.tensor(_encode(tok, text), dtype=torch.long)
    # 2. windows
    spans = window_spans(len(ids), context, stride)
    # 3. batched forward, summing fp32 nats over each window's new targets
    nats = 0.0
    scored = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(spans), desc=f"eval {data.name}", unit="window")
    for i in range(0, len(spans), batch_size):
        group = spans[i:i + batch_size]
        width = max(end - begin for begin, end, _ in group)
        batch = torch.zeros(len(group), width, dtype=torch.long)  # [W, C], right-padded
        for row, (begin, end, _) in enumerate(group):
            batch[row, :end - begin] = ids[begin:end]
        logits = model(batch.to(model.device))  # [W, C, V]
        logp = torch.log_softmax(logits.float(), dim=-1)
        for row, (begin, end, first) in enumerate(group):
            pos = torch.arange(first - begin, end - begin)  # target positions within the window
            targets = batch[row, pos].to(logp.device)
            nats -= logp[row, pos - 1].gather(-1, targets[:, None]).sum().item()
            scored += len(pos)
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    # 4. summary numbers
    return EvalResult(name=data.name, bits_per_byte=nats / math.log(2) / n_bytes,
                      perplexity=math.exp(nats / scored), bits_per_token=nats / math.log(2) / scored,
                      nats=nats, tokens=scored, bytes=n_bytes, context=context, stride=stride)
