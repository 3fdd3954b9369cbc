"""moeinfer.model.shape.ModelShape: the one shape type the simulators, the planner and the benchmark's
sparse utilization read, counted from a model or a checkpoint's config."""

from __future__ import annotations

from pathlib import Path

import torch

import moeinfer
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.model.shape import ModelShape
from moeinfer.offload.hardware import shape_from_checkpoint


def test_counts_from_a_float_model_match_the_sizes(tmp_path: Path) -> None:
    from hf_peers import save_hf_checkpoint

    save_hf_checkpoint("mixtral", tmp_path / "m")
    model = moeinfer.load(tmp_path / "m", dtype=torch.bfloat16, progress=False)
    c = model.config
    s = ModelShape.from_model(model)
    D, I = c.hidden_size, c.moe_intermediate_size
    assert s.expert_bytes == s.stored_expert_bytes == 3 * D * I * 2 and s.expert_params == 3 * D * I
    assert s.embed_row_bytes == D * 2 and s.vocab_size == c.vocab_size
    assert s.kv_slot_bytes == c.num_layers * 2 * c.num_kv_heads * c.head_dim * 2
    # a checkpoint's shape, from its config alone, in the checkpoint's dtype (not the meta model's fp32)
    moeinfer.save(model, tmp_path / "bf16")
    from_config = shape_from_checkpoint(tmp_path / "bf16")
    assert from_config.dtype_bytes == 2 and from_config.expert_bytes == 3 * D * I * 2
    assert from_config.dense_read_bytes == s.dense_read_bytes


def test_quantized_experts_count_as_stored() -> None:
    from offload_helpers import random_mixtral

    model = random_mixtral(layers=2, hidden=64, inter=48, vocab=128)
    float_shape = ModelShape.from_model(model)
    for layer in model.layers:
        ex = layer.mlp.experts
        layer.mlp.experts = QuantizedExperts.from_float(ex.gate_up_proj.detach(), ex.down_proj.detach(), [4] * 8,
                                                        group_size=32, algorithm="rtn")
    q = ModelShape.from_model(model)
    # 4-bit codes (half a byte each) plus an fp32 scale and zero per group of 32 columns of a row:
    # gate_up 96 rows x 2 groups of D=64, down 64 rows x 2 groups of I=48 (the second one short)
    per_expert = 3 * 64 * 48
    assert q.expert_bytes == per_expert // 2 + 2 * 4 * (96 * 2 + 64 * 2)
    assert q.expert_bytes < float_shape.expert_bytes == per_expert * 4
    assert q.dense_read_bytes == float_shape.dense_read_bytes
