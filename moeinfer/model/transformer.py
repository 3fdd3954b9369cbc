"""The decoder-only MoE transformer, eager reference for every supported architecture.

Shapes: B batch, T new tokens, S key slots, D hidden, V vocab.
Layer i: x += attn(norm(x)); x += ffn(norm(x)), where ffn is an MoEBlock or a dense SwiGLU
(DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers / decoder_sparse_step).
The model knows nothing of kernels, offloading, quantization or parallelism: they are applied
to it afterwards and replace one stage of the MoE block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moeinfer.config import ModelConfig
from moeinfer.model.attention import Attention
from moeinfer.model.kv_cache import CacheStep, KVCache
from moeinfer.model.mla import MLAttention
from moeinfer.model.mlp import DenseMLP
from moeinfer.model.moe import MoEBlock, ObserverHandle, RoutingObserver, combined
from moeinfer.model.norm import RMSNorm


TokenObserver = Callable[[torch.Tensor, torch.Tensor, bool], None]
"""token_observer(valid [B, T] bool, positions [B, T] int64, new_sequences): called by forward before
the layers run, so that routing observers can tell real tokens from padding (moeinfer.traces.trace).
new_sequences is True when the tokens start their rows (no cache, or an empty one)."""


def build_mask(key_valid: torch.Tensor, q_slots: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, S].

    key_valid [B, S]: slot holds a real token; q_slots [B, T]: slot index of each query.
    A query sees valid keys at or before its own slot (and within `window` slots if set); it always
    sees itself, so padding rows stay finite and never read another row's keys.
    """
    S = key_valid.shape[1]
    k_slots = torch.arange(S, device=key_valid.device)[None, None, :]  # [1, 1, S]
    q = q_slots[:, :, None]  # [B, T, 1]
    allowed = k_slots <= q
    if window is not None:
        allowed &= (q - k_slots) < window
    mask = (allowed & key_valid[:, None, :]) | (k_slots == q)  # [B, T, S]
    return mask[:, None]


def unpadded_on_cpu(key_valid: torch.Tensor, step: CacheStep | None) -> bool:
    """Whether a forward's keys key_valid [B, S] are all real tokens (one prompt, or prompts of one length)
    in rows that all start at one slot, tested on the CPU only (elsewhere the test would synchronise the
    device, and graph capture forbids it). Then each new token's position is its slot, and one new token
    per row is the last slot and sees every key (within a window of at least S): MoEModel.forward skips
    counting real tokens and building masks, with the same numbers."""
    return (key_valid.device.type == "cpu" and (step is None or step.uniform_start is not None)
            and bool(key_valid.all()))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.attention == "mla":
            self.self_attn: nn.Module = MLAttention(config, layer_idx)
        else:
            self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.layer_ffn[layer_idx] == "moe":
            self.mlp: nn.Module = MoEBlock(config, layer_idx)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size)
        self.window = config.sliding_window[layer_idx] if config.sliding_window else None

    def forward(self, x: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), **attn_kwargs)
        return x + self.mlp(self.post_attention_layernorm(x))


class MoEModel(nn.Module):
    """A causal LM: `model(input_ids) -> logits [B, T, V]`.

    `attention_mask` [B, T] (1 = token, 0 = padding) handles batches of different lengths; positions
    are counted over real tokens only. With a `cache`, the new tokens are written at the next slots
    and attend to everything cached before them.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.tokenizer: Any = None  # moeinfer.loading.tokenizer.Tokenizer, set by load()
        self.source_dir: str | None = None
        self.token_observers: list[TokenObserver] = []  # called in order before each forward
        # A prepared decode step that forward hands every forward over a cache first, set by the engine
        # while it decodes (moeinfer.engine.cpu_decode): program(input_ids, attention_mask, cache) ->
        # logits [B, T, V], or None where it does not take that forward.
        self.decode_program: Callable[..., torch.Tensor | None] | None = None

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoEBlock)]

    def add_routing_observer(self, fn: RoutingObserver) -> ObserverHandle:
        """Call `fn(layer_idx, routing)` on every routing decision of every MoE layer until
        `handle.remove()`, which detaches exactly this observer whatever else was attached since."""
        lists = []
        for block in self.moe_blocks():
            block.routing_observers.append(fn)
            lists.append(block.routing_observers)
        return ObserverHandle(lists, fn)

    def add_token_observer(self, fn: TokenObserver) -> ObserverHandle:
        """Call `fn(valid, positions, new_sequences)` before every forward until `handle.remove()`."""
        self.token_observers.append(fn)
        return ObserverHandle([self.token_observers], fn)

    @property
    def token_observer(self) -> TokenObserver | None:
        """The token observers as one callable (None = none); assigning replaces them all (None clears)."""
        return combined(self.token_observers)

    @token_observer.setter
    def token_observer(self, fn: TokenObserver | None) -> None:
        self.token_observers[:] = [] if fn is None else [fn]

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, return_hidden: bool = False, logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or the final hidden states [B, T, D] with `return_hidden`).
        `logits_to_keep` n > 0: logits of the last n positions only, [B, n, V] (transformers' argument
        of that name): generation needs one, and over a long prompt the LM head is the prefill's largest
        matmul."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        program = self.__dict__.get("decode_program")  # (absent from a model pickled before the seam)
        if program is not None and cache is not None and not return_hidden:
            logits = program(input_ids, attention_mask, cache)
            if logits is not None:
                return logits
        B, T = input_ids.shape
        device = input_ids.device
        new_valid = (torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None
                     else attention_mask.to(device=device, dtype=torch.bool))
        if cache is None:
            key_valid, step = new_valid, None
            q_slots = torch.arange(T, device=device).expand(B, T)
        else:
            step = cache.begin(new_valid)
            key_valid, q_slots = cache.valid[:, :step.end], step.q_slots
        unpadded = unpadded_on_cpu(key_valid, step)  # then the count of real tokens and masks are skipped
        sees_all = unpadded and T == 1
        # Position of each new token = number of real tokens before it in its row.
        positions = (q_slots if unpadded
                     else (key_valid.long().cumsum(-1) - 1).clamp(min=0).gather(1, q_slots))  # [B, T]
        for fn in self.token_observers:
            fn(new_valid, positions, step is None or step.uniform_start == 0)
        masks: dict[int | None, torch.Tensor | None] = {}
        rope_memo: dict = {}  # cos/sin computed by the first layer serve the others (RotaryEmbedding)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            if layer.window not in masks:
                if sees_all and (layer.window is None or key_valid.shape[1] <= layer.window):
                    masks[layer.window] = None  # the query is the last slot, every key within the window
                else:
                    mask = build_mask(key_valid, q_slots, layer.window)
                    # A mask that hides nothing is dropped on the CPU as well: attention then skips the
                    # boolean-to-additive conversion; the numbers are the same.
                    masks[layer.window] = None if device.type == "cpu" and bool(mask.all()) else mask
            x = layer(x, positions=positions, mask=masks[layer.window],
                      kv=cache.layers[i] if cache is not None else None, step=step, rope_memo=rope_memo)
        x = self.norm(x)
        if return_hidden:
            return x
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0 = every position), got {logits_to_keep}")
        return self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)

    def num_parameters(self) -> dict[str, int]:
        """Total parameters and parameters active per token (shared + top-k routed experts)."""
        # Routed experts count as the weights they stand for (3 * D * I each), whatever their storage:
        # packed low-bit codes, low-rank factors or an offloaded copy are the same parameters.
        per_expert = 3 * self.config.hidden_size * self.config.moe_intermediate_size
        blocks = self.moe_blocks()
        held = {id(p) for b in blocks for p in b.experts.parameters()}
        other = sum(p.numel() for p in self.parameters() if id(p) not in held)
        expert = sum(b.experts.num_experts * per_expert for b in blocks)
        active_expert = sum((b.gate.top_k or self.config.top_k) * per_expert for b in blocks)
        return {"total": other + expert, "active": other + active_expert, "experts": expert}
