"""The sizes of an MoE model that cost models need, without its weights: the offload simulator,
the expert-parallel simulator, the planner and the benchmark's sparse utilization (S-MBU/S-MFU,
moeinfer.bench.metrics) all read one `ModelShape` (from a built model, a config, or a named shape
of a published model).

Shapes: L MoE layers, E experts, K top-k, D hidden, I expert inner size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moeinfer.config import ModelConfig
from moeinfer.model.summary import expert_storage, summarize


@dataclass(frozen=True)
class ModelShape:
    """Bytes and flops per token of a MoE model (what the simulators charge)."""

    name: str
    num_layers: int  # L, MoE layers
    num_experts: int  # E
    top_k: int  # K
    hidden: int  # D
    inter: int  # I
    dtype_bytes: int = 2
    dense_params_per_layer: int = 0  # attention, norms, router (read every step); 0 = not known
    other_params: int = 0  # embeddings and LM head
    # Counted from a built model (from_model); 0 = not known, or derived from the sizes above.
    stored_expert_bytes: int = 0  # one expert as stored (quantized, low-rank); 0 = 3*D*I*dtype_bytes
    stored_expert_params: int = 0  # one expert's parameters as stored; 0 = 3*D*I
    vocab_size: int = 0
    dense_read_bytes: int = 0  # every non-expert weight a forward reads (LM head included, embedding not)
    dense_matmul_params: int = 0  # non-expert parameters in matmuls (attention, routers, shared/dense FFN, LM head)
    kv_slot_bytes: int = 0  # one token's KV-cache entry over all layers
    attn_flops_per_key: int = 0  # attention FLOPs per (query token, cached key), all layers

    @property
    def expert_bytes(self) -> int:
        return self.stored_expert_bytes or 3 * self.hidden * self.inter * self.dtype_bytes

    @property
    def expert_params(self) -> int:
        return self.stored_expert_params or 3 * self.hidden * self.inter

    @property
    def embed_row_bytes(self) -> int:
        return self.hidden * self.dtype_bytes

    def expert_flops(self, tokens: int) -> float:
        return 6.0 * self.hidden * self.inter * tokens

    @property
    def dense_bytes_per_layer(self) -> int:
        return self.dense_params_per_layer * self.dtype_bytes

    @classmethod
    def from_model(cls, model: Any, name: str = "model") -> ModelShape:
        """Counted from a built MoEModel's parameters (a meta-device model will do)."""
        c = model.config
        blocks = model.moe_blocks()
        n_exp = 0
        for b in blocks:
            n_exp += sum(p.numel() for p in b.experts.parameters())
        other = model.embed_tokens.weight.numel() + (0 if c.tie_word_embeddings else model.lm_head.weight.numel())
        total = sum(p.numel() for p in model.parameters())
        dense = (total - n_exp - other) // c.num_layers
        elem = model.dtype.itemsize
        stored_params, stored_bytes = expert_storage(model) if blocks else (0, 0)
        b = summarize(model)["bytes"]
        lm_head = model.lm_head.weight.numel()
        matmul = (b["attention"] + b["routers"] + b["shared_experts"] + b["dense_ffn"]) // elem + lm_head
        if c.attention == "mla":
            assert c.mla is not None
            slot = c.num_layers * (c.mla.kv_lora_rank + c.mla.qk_rope_head_dim) * elem
            per_key = 2 * c.num_heads * (c.mla.qk_nope_head_dim + c.mla.qk_rope_head_dim + c.mla.v_head_dim)
        else:
            slot = c.num_layers * 2 * c.num_kv_heads * c.head_dim * elem
            per_key = 4 * c.num_heads * c.head_dim
        read = sum(b[k] for k in ("attention", "routers", "shared_experts", "dense_ffn", "norms")) + lm_head * elem
        return cls(name=name, num_layers=len(blocks), num_experts=c.num_experts, top_k=c.top_k, hidden=c.hidden_size,
                   inter=c.moe_intermediate_size, dtype_bytes=elem, dense_params_per_layer=dense,
                   other_params=other, stored_expert_bytes=stored_bytes, stored_expert_params=stored_params,
                   vocab_size=model.embed_tokens.weight.shape[0], dense_read_bytes=read, dense_matmul_params=matmul,
                   kv_slot_bytes=slot, attn_flops_per_key=per_key * c.num_layers)

    @classmethod
    def from_config(cls, config: ModelConfig, name: str = "model", *, dtype_bytes: int = 2) -> ModelShape:
        """The expert sizes from a config alone (dense parameters not counted)."""
        return cls(name=name, num_layers=len(config.moe_layers), num_experts=config.num_experts, top_k=config.top_k,
                   hidden=config.hidden_size, inter=config.moe_intermediate_size, dtype_bytes=dtype_bytes)


def _mixtral_8x7b() -> ModelShape:
    D, L, V = 4096, 32, 32000
    attn = D * D * 2 + D * 1024 * 2  # q, o [D, D]; k, v [1024, D] (8 KV heads of 128)
    return ModelShape(name="mixtral-8x7b", num_layers=L, num_experts=8, top_k=2, hidden=D, inter=14336,
                      dtype_bytes=2, dense_params_per_layer=attn + 8 * D + 2 * D, other_params=2 * V * D)


SHAPES: dict[str, ModelShape] = {s.name: s for s in (
    _mixtral_8x7b(),
    ModelShape("qwen3-30b-a3b", num_layers=48, num_experts=128, top_k=8, hidden=2048, inter=768),
    ModelShape("deepseek-v3", num_layers=58, num_experts=256, top_k=8, hidden=7168, inter=2048),
)}
