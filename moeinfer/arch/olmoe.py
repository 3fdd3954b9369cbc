"""OLMoE (Muennighoff et al., 2024): 64 experts top-8, RMSNorm over the full q and k projections,
optional clipping of q/k/v."""

from __future__ import annotations

from typing import Any

from moeinfer.arch import ArchSpec, register
from moeinfer.arch.common import common_fields, require, require_any, rope_config
from moeinfer.config import ModelConfig, RouterConfig


def parse(hf: dict[str, Any]) -> ModelConfig:
    base = common_fields(hf)
    inner = int(require(hf, "intermediate_size"))
    clip = hf.get("clip_qkv")
    return ModelConfig(
        **base,
        intermediate_size=inner,
        moe_intermediate_size=inner,
        router=RouterConfig(num_experts=int(require_any(hf, "num_experts", "num_local_experts")),
                            top_k=int(require(hf, "num_experts_per_tok")),
                            norm_topk_prob=bool(hf.get("norm_topk_prob", False))),
        layer_ffn=("moe",) * base["num_layers"],
        rope=rope_config(hf),
        qkv_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        qk_norm="full",
        clip_qkv=None if clip is None else float(clip),
    )


register(ArchSpec(model_type="olmoe", hf_class="OlmoeForCausalLM", parse=parse))
