"""Tiny random checkpoints built with transformers' own config classes (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

BASE = dict(vocab_size=97, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
            rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None)

ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=56, moe_intermediate_size=20, shared_expert_intermediate_size=36,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "qwen3_moe": dict(intermediate_size=56, moe_intermediate_size=20, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, head_dim=12),
    "olmoe": dict(intermediate_size=20, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False),
    "deepseek_v2": dict(intermediate_size=56, moe_intermediate_size=20, n_routed_experts=8,
                        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4,
                        v_head_dim=8, n_group=1, topk_group=1, topk_method="greedy",
                        routed_scaling_factor=1.0, num_key_value_heads=4),
    "deepseek_v3": dict(intermediate_size=56, moe_intermediate_size=20, n_routed_experts=8,
                        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                        v_head_dim=8, n_group=2, topk_group=1, norm_topk_prob=True,
                        routed_scaling_factor=2.5, num_key_value_heads=4),
}

HF_CLASSES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
}


def build_hf_model(arch: str, seed: int = 0, **overrides: Any):
    import transformers

    cfg_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[arch])
    kwargs = {**BASE, **ARCH_DEFAULTS[arch], **overrides}
    config = cfg_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if arch == "deepseek_v3":  # a non-zero correction bias exercises its use in expert choice
        with torch.no_grad():
            for layer in model.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if gate is not None and hasattr(gate, "e_score_correction_bias"):
                    gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    return model


def save_hf_checkpoint(arch: str, path: Path, seed: int = 0, **overrides: Any):
    model = build_hf_model(arch, seed, **overrides)
    model.save_pretrained(path)
    return model
