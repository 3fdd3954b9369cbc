"""Next-token selection: greedy, or temperature / top-k / top-p (Holtzman et al., 2020) sampling.

Numerically safe for every accepted value: the logits are shifted so that their maximum is 0 before
they are divided by the temperature, so no value overflows to +inf and the best token always keeps
weight 1; a temperature whose inverse does not fit in float32 (below ~3e-39) is greedy, its limit;
top-p always keeps the most likely token, however small p is. Non-finite parameters are refused.

Shapes: B batch, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_F32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax: temperature 0, top_k 1, or a temperature so small
        that 1/temperature overflows float32 (the limit of temperature -> 0 is greedy)."""
        return self.temperature == 0 or self.top_k == 1 or 1.0 / self.temperature > _F32_MAX


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest top-p nucleus to -inf. [B, V] -> [B, V].
    The most likely token is always kept."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the token that crosses top_p
        drop[..., 0] = False  # a top_p below float32's resolution still keeps the best token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    if params.greedy:
        return logits.argmax(-1)
    logits = logits.float()
    # 1. Shift the maximum to 0, then scale: values stay <= 0, the best token keeps exp(0) = 1.
    scaled = (logits - logits.amax(-1, keepdim=True)) * (1.0 / params.temperature)
    # 2. Filter, then draw.
    scaled = filter_logits(scaled, top_k=params.top_k, top_p=params.top_p)
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)
