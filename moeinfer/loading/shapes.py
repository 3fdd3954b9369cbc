"""Real model shapes for `moeinfer init`: the config.json fields of released MoE checkpoints.

Each preset holds the architecture-defining fields of the model's published config.json (Hugging
Face hub, read by hand; nothing is downloaded), so a random-weight checkpoint built from it has the
real tensor shapes, routing and attention. `resolve_shape` turns a `--shape` text (a preset name,
`key=val,...` overrides, or both: `PRESET,key=val,...`) into a config.json dict.

Token ids follow moeinfer's shipped tokenizer (bos 0, eos 1), which `moeinfer init` writes beside
the weights; the embedding keeps the preset's vocabulary size.
"""

from __future__ import annotations

from typing import Any

import yaml

from moeinfer.arch import parse_config
from moeinfer.config import ConfigError

_COMMON: dict[str, Any] = dict(hidden_act="silu", initializer_range=0.02, attention_dropout=0.0,
                               tie_word_embeddings=False, use_cache=True, bos_token_id=0, eos_token_id=1,
                               pad_token_id=None)

SHAPES: dict[str, dict[str, Any]] = {
    # allenai/OLMoE-1B-7B-0924
    "OLMoE-1B-7B": dict(
        model_type="olmoe", architectures=["OlmoeForCausalLM"], vocab_size=50304, hidden_size=2048,
        intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
        num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, clip_qkv=None, attention_bias=False,
        router_aux_loss_coef=0.01, output_router_logits=False),
    # Qwen/Qwen3-30B-A3B
    "Qwen3-30B-A3B": dict(
        model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048,
        intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_scaling=None, attention_bias=False, use_sliding_window=False,
        sliding_window=None, max_window_layers=48, router_aux_loss_coef=0.001, output_router_logits=False),
    # mistralai/Mixtral-8x7B-v0.1
    "Mixtral-8x7B": dict(
        model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=1000000.0, sliding_window=None, router_aux_loss_coef=0.02, output_router_logits=False),
    # deepseek-ai/DeepSeek-V2-Lite
    "DeepSeek-V2-Lite": dict(
        model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=102400,
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64,
        num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1, kv_lora_rank=512, q_lora_rank=None,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=1.0,
        topk_method="greedy", n_group=1, topk_group=1, scoring_func="softmax", norm_topk_prob=False,
        max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
    # deepseek-ai/DeepSeek-V3
    "DeepSeek-V3": dict(
        model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=129280, hidden_size=7168,
        intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8,
        first_k_dense_replace=3, moe_layer_freq=1, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=2.5, topk_method="noaux_tc", n_group=8,
        topk_group=4, scoring_func="sigmoid", norm_topk_prob=True, max_position_embeddings=163840,
        rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False, rope_interleave=True,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),
}

# --arch name -> its default preset (the base that bare `key=val` overrides change)
ARCH_DEFAULT_SHAPE = {"olmoe": "OLMoE-1B-7B", "qwen3_moe": "Qwen3-30B-A3B", "mixtral": "Mixtral-8x7B",
                      "deepseek_v2": "DeepSeek-V2-Lite", "deepseek_v3": "DeepSeek-V3"}


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--shape item {item!r}: expected a preset name or KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def resolve_shape(shape: str | None, *, arch: str | None = None, layers: int | None = None) -> dict[str, Any]:
    """`--shape` text (+ `--arch`, `--layers`) -> config.json dict. Unknown presets, archs and keys
    are errors that list what is allowed."""
    items = [s.strip() for s in (shape or "").split(",") if s.strip()]
    preset = items.pop(0) if items and "=" not in items[0] else None
    if arch is not None and arch not in ARCH_DEFAULT_SHAPE:
        raise ConfigError(f"unknown --arch {arch!r}; available: {', '.join(ARCH_DEFAULT_SHAPE)}")
    if preset is None:
        if arch is None:
            raise ConfigError("give --arch or a --shape preset (" + ", ".join(SHAPES) + ")")
        preset = ARCH_DEFAULT_SHAPE[arch]
    if preset not in SHAPES:
        raise ConfigError(f"unknown shape preset {preset!r}; available: {', '.join(SHAPES)} (or KEY=VALUE,...)")
    base = SHAPES[preset]
    if arch is not None and base["model_type"] != arch:
        raise ConfigError(f"shape preset {preset!r} is a {base['model_type']} model, not --arch {arch}")
    overrides = _parse_overrides(items)
    unknown = sorted(set(overrides) - set(base) - {"head_dim"})
    if unknown:
        raise ConfigError(f"--shape: {', '.join(unknown)} not a field of {preset} ({base['model_type']}); "
                          f"fields: {', '.join(sorted(base))}")
    hf = {**_COMMON, **base, **overrides}
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"--layers must be >= 1, got {layers}")
        hf["num_hidden_layers"] = layers
    if hf["model_type"] == "qwen3_moe":
        hf["max_window_layers"] = hf["num_hidden_layers"]
    parse_config(hf)  # the loader's own checks (head counts, groups, ...) before anything is written
    return hf
