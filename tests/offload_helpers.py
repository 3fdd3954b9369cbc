"""Shared helpers of the offload tests: random Mixtral-shaped models built without a checkpoint."""

from __future__ import annotations

import numpy as np
import torch

from moeinfer.arch import parse_config
from moeinfer.traces.trace import RoutingTrace
from moeinfer.model.transformer import MoEModel


def random_mixtral(*, layers: int = 3, experts: int = 8, top_k: int = 2, hidden: int = 32, inter: int = 48,
                   vocab: int = 128, seed: int = 0, dtype: torch.dtype = torch.float32) -> MoEModel:
    hf = {"model_type": "mixtral", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
          "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": experts,
          "num_experts_per_tok": top_k, "vocab_size": vocab, "max_position_embeddings": 128,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
    model = MoEModel(parse_config(hf))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.0) + (1.0 if p.dim() == 1 else 0.0))
        for b in model.moe_blocks():
            b.gate.weight.mul_(4.0)  # decisive routing: greedy tokens robust, routing varied
    return model.to(dtype).eval()


def hand_trace(experts: list[list[list[int]]], *, seq: list[int] | None = None, num_experts: int = 4,
               step: list[int] | None = None) -> RoutingTrace:
    """experts[token][layer] = chosen experts; weights split evenly."""
    e = np.array(experts, dtype=np.int16)
    N = e.shape[0]
    return RoutingTrace(experts=e, weights=np.full(e.shape, 1.0 / e.shape[2], dtype=np.float32),
                        seq=seq if seq is not None else [0] * N, pos=list(range(N)),
                        is_prompt=np.zeros(N, dtype=bool), layers=np.arange(e.shape[1]), num_experts=num_experts,
                        step=step)


def generate_with_logits(model: MoEModel, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of `prompt` and the logits of every forward of that generation (prefill and decode
    steps, flattened and concatenated), taken at the LM head as the run computes them: exact paths
    compare them with torch.equal, since equal greedy tokens let a 1% error through."""
    import moeinfer

    seen: list[torch.Tensor] = []
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().reshape(-1).cpu()))
    try:
        tokens = moeinfer.generate(model, [prompt], max_new_tokens=max_new_tokens)[0].token_ids
    finally:
        handle.remove()
    return tokens, torch.cat(seen)
