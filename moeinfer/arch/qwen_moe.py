"""Qwen-MoE families.

qwen2_moe (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): fine-grained experts plus one shared expert whose
output is scaled by sigmoid(shared_expert_gate(x)); `norm_topk_prob`; MoE every
`decoder_sparse_step` layers except `mlp_only_layers`; q/k/v projections with bias.
qwen3_moe (Qwen3-30B-A3B, Qwen3-235B-A22B): no shared expert, RMSNorm on q and k per head.
"""

from __future__ import annotations

from typing import Any

from moeinfer.arch import ArchSpec, register
from moeinfer.arch.common import common_fields, require, require_any, rope_config, sliding_windows
from moeinfer.config import ConfigError, ModelConfig, RouterConfig


def _layer_ffn(hf: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    num_experts = int(require_any(hf, "num_experts", "num_local_experts"))
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    mlp_only = set(hf.get("mlp_only_layers") or [])
    bad = sorted(i for i in mlp_only if not 0 <= i < num_layers)
    if bad:
        raise ConfigError(f"config.json mlp_only_layers {bad} are outside 0..{num_layers - 1}")
    return tuple("moe" if i not in mlp_only and num_experts > 0 and (i + 1) % step == 0 else "dense"
                 for i in range(num_layers))


def _qwen2_windows(hf: dict[str, Any], num_layers: int) -> tuple[int | None, ...] | None:
    if hf.get("layer_types") or not hf.get("use_sliding_window"):
        return sliding_windows(hf, num_layers, default_on=False)
    window, max_window_layers = hf.get("sliding_window"), int(hf.get("max_window_layers", num_layers))
    return tuple(int(window) if (i + 1) % 2 and i < max_window_layers else None for i in range(num_layers))


def _moe_fields(hf: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The fields both Qwen-MoE generations read the same way."""
    return dict(
        intermediate_size=int(hf.get("intermediate_size") or require(hf, "moe_intermediate_size")),
        moe_intermediate_size=int(require(hf, "moe_intermediate_size")),
        router=RouterConfig(num_experts=int(require_any(hf, "num_experts", "num_local_experts")),
                            top_k=int(require(hf, "num_experts_per_tok")),
                            norm_topk_prob=bool(hf.get("norm_topk_prob", False))),
        layer_ffn=_layer_ffn(hf, num_layers),
        rope=rope_config(hf),
    )


def parse_qwen2(hf: dict[str, Any]) -> ModelConfig:
    base = common_fields(hf)
    n = base["num_layers"]
    return ModelConfig(
        **base,
        **_moe_fields(hf, n),
        qkv_bias=bool(hf.get("qkv_bias", True)),
        sliding_window=_qwen2_windows(hf, n),
        shared_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
        shared_expert_gate=bool(hf.get("shared_expert_intermediate_size")),
    )


def parse_qwen3(hf: dict[str, Any]) -> ModelConfig:
    base = common_fields(hf)
    n = base["num_layers"]
    windows = (sliding_windows(hf, n, default_on=True) if hf.get("use_sliding_window") or hf.get("layer_types")
               else None)
    return ModelConfig(
        **base,
        **_moe_fields(hf, n),
        qkv_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        qk_norm="head",
        sliding_window=windows,
    )


register(ArchSpec(model_type="qwen2_moe", hf_class="Qwen2MoeForCausalLM", parse=parse_qwen2))
register(ArchSpec(model_type="qwen3_moe", hf_class="Qwen3MoeForCausalLM", parse=parse_qwen3))
