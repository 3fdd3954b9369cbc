"""The sizes of an MoE model that cost models need, without its weights: the offload simulator,
the expert-parallel simulator and the planner to come read a `ModelShape` (from a built model, a
config, or a named shape of a published model).

Shapes: L MoE layers, E experts, K top-k, D hidden, I expert inner size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moeinfer.config import ModelConfig


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

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.inter * self.dtype_bytes

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
        return cls(name=name, num_layers=len(blocks), num_experts=c.num_experts, top_k=c.top_k, hidden=c.hidden_size,
                   inter=c.moe_intermediate_size, dtype_bytes=model.dtype.itemsize, dense_params_per_layer=dense,
                   other_params=other)

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
