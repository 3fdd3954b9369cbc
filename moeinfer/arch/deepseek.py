"""DeepSeek-V2 and DeepSeek-V3 (DeepSeek-AI, 2024): multi-head latent attention and DeepSeekMoE.

Both: MLA (`moeinfer.model.mla`), the first `first_k_dense_replace` layers dense, then fine-grained
routed experts plus `n_shared_experts` shared experts fused into one SwiGLU of
moe_intermediate_size * n_shared_experts; routed weights times `routed_scaling_factor`.
deepseek_v2 (V2, V2-Lite, V2.5): softmax scores, "greedy" top-k or "group_limited_greedy" (keep the
  `topk_group` groups with the best single expert); RoPE on interleaved pairs.
deepseek_v3 (V3, V3.1, R1): sigmoid scores; experts chosen with score + e_score_correction_bias
  (auxiliary-loss-free balancing) within the `topk_group` groups of best top-2 sum, weighted by the
  unbiased scores, renormalised when `norm_topk_prob`; RoPE layout per `rope_interleave`.
Semantics follow transformers 5.23, including its defaults for absent fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moeinfer.arch import ArchSpec, register
from moeinfer.arch.common import check_value, common_fields, require, require_any, rope_config
from moeinfer.config import ConfigError, MLAConfig, ModelConfig, RouterConfig

# transformers 5.23's config defaults for the behavioural fields a config.json may omit.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(first_k_dense_replace=0, n_shared_experts=2, routed_scaling_factor=1.0,
                        topk_method="greedy", n_group=None, topk_group=None),
    "deepseek_v3": dict(first_k_dense_replace=3, n_shared_experts=1, routed_scaling_factor=2.5,
                        n_group=8, topk_group=4, norm_topk_prob=True, rope_interleave=True),
}

_RENAMES = ((".mlp.shared_experts.", ".mlp.shared_expert."),)


def _with_defaults(hf: dict[str, Any]) -> dict[str, Any]:
    return {**_DEFAULTS[hf["model_type"]], **hf}


def _mla(hf: dict[str, Any]) -> MLAConfig:
    if "q_lora_rank" not in hf:  # transformers would silently assume 1536
        raise ConfigError(f"config.json ({hf['model_type']}) lacks the field 'q_lora_rank' "
                          "(null when queries are not compressed)")
    q_lora_rank = hf["q_lora_rank"]
    return MLAConfig(kv_lora_rank=int(require(hf, "kv_lora_rank")),
                     qk_nope_head_dim=int(require(hf, "qk_nope_head_dim")),
                     qk_rope_head_dim=int(require(hf, "qk_rope_head_dim")),
                     v_head_dim=int(require(hf, "v_head_dim")),
                     q_lora_rank=None if q_lora_rank is None else int(q_lora_rank))


def _layer_ffn(hf: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    # transformers places an MoE block at every layer >= first_k_dense_replace and ignores
    # moe_layer_freq; DeepSeek's own code uses it, so any value but 1 would be ambiguous.
    check_value(hf, "moe_layer_freq", (1,), 1)
    first_dense = int(hf.get("first_k_dense_replace") or 0)
    if first_dense < 0:
        raise ConfigError(f"config.json first_k_dense_replace must be >= 0, got {first_dense}")
    return tuple("dense" if i < first_dense else "moe" for i in range(num_layers))


def _scaling(hf: dict[str, Any]) -> float:
    value = hf.get("routed_scaling_factor")
    return 1.0 if value is None else float(value)


def _groups(hf: dict[str, Any]) -> tuple[int, int]:
    n_group, topk_group = int(require(hf, "n_group")), int(require(hf, "topk_group"))
    if n_group < 1:
        raise ConfigError(f"config.json n_group must be >= 1, got {n_group}")
    return n_group, topk_group


def _model_config(raw: dict[str, Any], hf: dict[str, Any], router: RouterConfig, *,
                  interleaved: bool) -> ModelConfig:
    """Everything V2 and V3 share; `hf` is `raw` with the defaults filled in."""
    base = common_fields(hf)
    base["hf_config"] = dict(raw)  # saving writes back what was read, not the defaults
    check_value(hf, "mlp_bias", (False,), False)
    heads = base["num_heads"]
    kv_heads = hf.get("num_key_value_heads")
    if kv_heads is not None and int(kv_heads) != heads:
        raise ConfigError(f"config.json num_key_value_heads={kv_heads} must equal num_attention_heads={heads}: "
                          "MLA up-projects its latent to one key and value per query head")
    mla = _mla(hf)
    rope = rope_config(hf, interleaved=interleaved)
    if rope.type == "yarn" and hf.get("original_max_position_embeddings") is not None:
        # transformers lets a top-level original_max_position_embeddings override the rope dict's.
        rope = dataclasses.replace(rope, original_max_position_embeddings=int(hf["original_max_position_embeddings"]))
    moe_inner = int(require(hf, "moe_intermediate_size"))
    n_shared = int(hf.get("n_shared_experts") or 0)
    attention_bias = bool(hf.get("attention_bias", False))
    base.update(num_kv_heads=heads, head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim)
    return ModelConfig(
        **base,
        intermediate_size=int(require(hf, "intermediate_size")),
        moe_intermediate_size=moe_inner,
        router=router,
        layer_ffn=_layer_ffn(hf, base["num_layers"]),
        rope=rope,
        attention="mla",
        mla=mla,
        qkv_bias=attention_bias,  # on q_a_proj and kv_a_proj_with_mqa
        o_bias=attention_bias,
        shared_intermediate_size=moe_inner * n_shared,
        shared_expert_gate=False,
    )


def _num_experts(hf: dict[str, Any]) -> int:
    return int(require_any(hf, "n_routed_experts", "num_local_experts", "num_experts"))


def parse_v2(raw: dict[str, Any]) -> ModelConfig:
    hf = _with_defaults(raw)
    check_value(hf, "scoring_func", ("softmax",), "softmax")
    method = check_value(hf, "topk_method", ("greedy", "group_limited_greedy"), "greedy")
    num_experts = _num_experts(hf)
    if method == "greedy":  # n_group/topk_group are ignored by greedy top-k
        n_group, topk_group = 1, 1
    else:
        n_group, topk_group = _groups(hf)
    router = RouterConfig(
        num_experts=num_experts,
        top_k=int(require(hf, "num_experts_per_tok")),
        score_func="softmax",
        # transformers 5.23's DeepseekV2TopkRouter never renormalises the top-k weights, whatever
        # norm_topk_prob says (DeepSeek's released V2 configs set it false); we follow transformers.
        norm_topk_prob=False,
        scaling=_scaling(hf),
        n_group=n_group,
        topk_group=topk_group,
        group_score="max",
        correction_bias=False,
    )
    # V2's rotary embedding multiplies complex numbers made of adjacent pairs: interleaved layout.
    return _model_config(raw, hf, router, interleaved=True)


def parse_v3(raw: dict[str, Any]) -> ModelConfig:
    hf = _with_defaults(raw)
    check_value(hf, "scoring_func", ("sigmoid",), "sigmoid")
    check_value(hf, "topk_method", ("noaux_tc",), "noaux_tc")
    num_experts = _num_experts(hf)
    n_group, topk_group = _groups(hf)
    if num_experts % n_group == 0 and num_experts // n_group < 2:
        raise ConfigError(f"config.json n_routed_experts={num_experts} / n_group={n_group} leaves fewer than 2 "
                          "experts per group; DeepSeek-V3 scores a group by its two best experts")
    router = RouterConfig(
        num_experts=num_experts,
        top_k=int(require(hf, "num_experts_per_tok")),
        score_func="sigmoid",
        norm_topk_prob=bool(hf.get("norm_topk_prob")),
        scaling=_scaling(hf),
        n_group=n_group,
        topk_group=topk_group,
        group_score="top2_sum",
        correction_bias=True,
    )
    interleaved = bool(check_value(hf, "rope_interleave", (True, False), True))
    return _model_config(raw, hf, router, interleaved=interleaved)


register(ArchSpec(model_type="deepseek_v2", hf_class="DeepseekV2ForCausalLM", parse=parse_v2, renames=_RENAMES))
register(ArchSpec(model_type="deepseek_v3", hf_class="DeepseekV3ForCausalLM", parse=parse_v3, renames=_RENAMES))
