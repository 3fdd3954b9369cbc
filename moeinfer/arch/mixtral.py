"""Mixtral (Jiang et al., 2024, "Mixtral of Experts"): top-2 of 8, softmax then renormalised top-k."""

from __future__ import annotations

from typing import Any

from moeinfer.arch import ArchSpec, register
from moeinfer.arch.common import common_fields, require, rope_config, sliding_windows
from moeinfer.config import ModelConfig, RouterConfig


def parse(hf: dict[str, Any]) -> ModelConfig:
    base = common_fields(hf)
    inner = int(require(hf, "intermediate_size"))
    return ModelConfig(
        **base,
        intermediate_size=inner,
        moe_intermediate_size=inner,
        router=RouterConfig(num_experts=int(require(hf, "num_local_experts")),
                            top_k=int(hf.get("num_experts_per_tok", 2)), norm_topk_prob=True),
        layer_ffn=("moe",) * base["num_layers"],
        rope=rope_config(hf),
        sliding_window=sliding_windows(hf, base["num_layers"], default_on=True),
    )


SPEC = register(ArchSpec(
    model_type="mixtral",
    hf_class="MixtralForCausalLM",
    parse=parse,
    renames=((".block_sparse_moe.", ".mlp."),),
    expert_names=("w1", "w3", "w2"),
))
