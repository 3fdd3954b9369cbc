"""DeepSeek-V2/V3 (moeinfer's deepseek_v2, deepseek_v3) <-> llama.cpp's `deepseek2` GGUF architecture.

Shapes: H heads, C kv_lora_rank, Dn qk_nope_head_dim, R qk_rope_head_dim, Dv v_head_dim.

The layout is the one llama.cpp's converter writes (convert_hf_to_gguf.py, DeepseekV2Model) and the
loader of the llama.cpp that llama-cpp-python 0.3.36 vendors reads (src/models/deepseek2.cpp):

- MLA in llama.cpp's absorbed form: kv_b_proj [H*(Dn+Dv), C] is split into `attn_k_b` [H, C, Dn] (each
  head's key rows, transposed) and `attn_v_b` [H, Dv, C]; `attention.key_length_mla` = Dn+R and
  `value_length_mla` = Dv give the per-head sizes, while `key_length` (C+R), `value_length` (C) and
  `head_count_kv` (1) describe the single latent "head" llama.cpp caches. Older files hold `attn_kv_b`
  whole and no *_mla keys (key_length = Dn+R, value_length = Dv); import reads both layouts.
- queries: `attn_q_a`, `attn_q_a_norm`, `attn_q_b` with `attention.q_lora_rank`, or `attn_q` with
  q_lora_rank 0 (V2-Lite); llama.cpp requires the key unless the model has 26 or 27 layers, so it is
  always written.
- FFN: the first `leading_dense_block_count` layers dense (ffn_gate/up/down, `feed_forward_length`),
  the rest routed experts (`expert_feed_forward_length`) plus `expert_shared_count` shared experts of
  the same width (ffn_*_shexp);
- routing: `expert_gating_func` softmax (V2) or sigmoid (V3, with the correction bias `exp_probs_b`),
  `expert_group_count`/`expert_group_used_count`, `expert_weights_norm`, `expert_weights_scale`.
  Import takes sigmoid as deepseek_v3 and softmax as deepseek_v2.
- RoPE: llama.cpp rotates adjacent pairs, DeepSeek's interleaved layout; a deepseek_v3 config with
  rope_interleave=false gets the rotary rows of its q and kv_a projections reordered into that layout
  (`permute_qk`, exact), so it comes back as an interleaved model computing the same logits.
  YaRN keys: moeinfer.loading.gguf.ropekeys.

Refused with a GGUFError (llama.cpp would compute something else): attention biases, dense layers
after MoE layers, no shared expert, renormalised softmax weights. Said in the export notes:
llama.cpp ranks expert groups by their two best experts (V3's rule) where V2's group_limited_greedy
ranks them by the best one.
"""

from __future__ import annotations

from typing import Any

import torch

from moeinfer.config import ModelConfig
from moeinfer.loading.gguf.errors import GGUFError
from moeinfer.loading.gguf.names import permute_qk
from moeinfer.loading.gguf.ropekeys import f32

ARCH = "deepseek2"
SOFTMAX, SIGMOID = 1, 2  # llama.cpp's llama_expert_gating_func_type (gguf.ExpertGatingFuncType)


def _leading_dense(config: ModelConfig) -> int:
    dense = 0
    while dense < config.num_layers and config.layer_ffn[dense] == "dense":
        dense += 1
    if any(kind != "moe" for kind in config.layer_ffn[dense:]):
        raise GGUFError(f"{config.model_type}: layer kinds {list(config.layer_ffn)}: llama.cpp's deepseek2 has dense "
                        "FFN layers only before the first MoE layer (leading_dense_block_count)")
    return dense


def _shared_count(config: ModelConfig) -> int:
    shared, inner = config.shared_intermediate_size, config.moe_intermediate_size
    if shared <= 0 or shared % inner:
        raise GGUFError(f"{config.model_type}: shared expert width {shared} is not a positive multiple of the expert "
                        f"width {inner}; llama.cpp's deepseek2 needs expert_shared_count >= 1 experts of that width")
    return shared // inner


def check(config: ModelConfig) -> list[str]:
    """Refuse what llama.cpp's deepseek2 cannot express; return notes on what it computes differently."""
    notes: list[str] = []
    if config.qkv_bias or config.o_bias:
        raise GGUFError(f"{config.model_type}: attention_bias has no tensors in llama.cpp's deepseek2")
    _leading_dense(config)
    _shared_count(config)
    r = config.router
    if r.score_func == "softmax" and (r.norm_topk_prob or r.correction_bias):
        raise GGUFError(f"{config.model_type}: softmax routing with renormalised weights or a correction bias "
                        "is not a DeepSeek-V2 router")
    if r.n_group > 1 and r.topk_group < r.n_group and r.group_score == "max":
        notes.append(f"{r.n_group} expert groups ranked by their best expert (group_limited_greedy): llama.cpp ranks "
                     "groups by the sum of their two best experts, so its expert choice can differ")
    return notes


def write_metadata(writer: Any, config: ModelConfig, *, num_experts: int) -> None:
    """The deepseek2.* keys llama.cpp reads (rope keys: ropekeys.write_rope)."""
    a, w, mla, r = ARCH, writer, config.mla, config.router
    assert mla is not None
    w.add_uint32(f"{a}.vocab_size", config.vocab_size)
    w.add_uint32(f"{a}.context_length", config.max_position_embeddings)
    w.add_uint32(f"{a}.embedding_length", config.hidden_size)
    w.add_uint32(f"{a}.block_count", config.num_layers)
    w.add_uint32(f"{a}.feed_forward_length", config.intermediate_size)
    w.add_uint32(f"{a}.expert_feed_forward_length", config.moe_intermediate_size)
    w.add_uint32(f"{a}.leading_dense_block_count", _leading_dense(config))
    w.add_uint32(f"{a}.attention.head_count", config.num_heads)
    w.add_uint32(f"{a}.attention.head_count_kv", 1)
    w.add_uint32(f"{a}.attention.q_lora_rank", mla.q_lora_rank or 0)
    w.add_uint32(f"{a}.attention.kv_lora_rank", mla.kv_lora_rank)
    w.add_uint32(f"{a}.attention.key_length", mla.kv_lora_rank + mla.qk_rope_head_dim)
    w.add_uint32(f"{a}.attention.value_length", mla.kv_lora_rank)
    w.add_uint32(f"{a}.attention.key_length_mla", mla.qk_nope_head_dim + mla.qk_rope_head_dim)
    w.add_uint32(f"{a}.attention.value_length_mla", mla.v_head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    w.add_uint32(f"{a}.rope.dimension_count", mla.qk_rope_head_dim)
    w.add_uint32(f"{a}.expert_count", num_experts)
    w.add_uint32(f"{a}.expert_used_count", r.top_k)
    w.add_uint32(f"{a}.expert_shared_count", _shared_count(config))
    w.add_float32(f"{a}.expert_weights_scale", r.scaling)
    w.add_bool(f"{a}.expert_weights_norm", r.norm_topk_prob)
    w.add_uint32(f"{a}.expert_gating_func", SIGMOID if r.score_func == "sigmoid" else SOFTMAX)
    if r.n_group > 1 and r.topk_group < r.n_group:  # all groups kept = no group limit
        w.add_uint32(f"{a}.expert_group_count", r.n_group)
        w.add_uint32(f"{a}.expert_group_used_count", r.topk_group)


def hf_fields(meta: Any) -> dict[str, Any]:
    """The DeepSeek config.json fields (model type, MLA, FFN, router) from the deepseek2.* keys."""
    a = ARCH
    gating = meta.int(f"{a}.expert_gating_func", SOFTMAX)
    if gating not in (SOFTMAX, SIGMOID):
        raise GGUFError(f"{meta.path}: {a}.expert_gating_func {gating} is not supported (1 softmax, 2 sigmoid)")
    rope_dim = meta.int(f"{a}.rope.dimension_count")
    if meta.get(f"{a}.attention.key_length_mla") is not None:
        qk_dim, v_dim = meta.int(f"{a}.attention.key_length_mla"), meta.int(f"{a}.attention.value_length_mla")
    else:  # files from converters before the k_b/v_b split: MHA head sizes
        qk_dim, v_dim = meta.int(f"{a}.attention.key_length"), meta.int(f"{a}.attention.value_length")
    if qk_dim <= rope_dim:
        raise GGUFError(f"{meta.path}: key length {qk_dim} leaves no non-rotary part beside {rope_dim} rotary dims")
    q_lora = meta.int(f"{a}.attention.q_lora_rank", 0)
    groups, used = meta.int(f"{a}.expert_group_count", 1), meta.int(f"{a}.expert_group_used_count", 1)
    norm = bool(meta.get(f"{a}.expert_weights_norm", False))
    scale = float(meta.get(f"{a}.expert_weights_scale", 0.0))
    hf: dict[str, Any] = {
        "intermediate_size": meta.int(f"{a}.feed_forward_length"),
        "moe_intermediate_size": meta.int(f"{a}.expert_feed_forward_length"),
        "first_k_dense_replace": meta.int(f"{a}.leading_dense_block_count", 0),
        "n_shared_experts": meta.int(f"{a}.expert_shared_count"),
        "n_routed_experts": meta.int(f"{a}.expert_count"),
        "q_lora_rank": q_lora or None, "kv_lora_rank": meta.int(f"{a}.attention.kv_lora_rank"),
        "qk_nope_head_dim": qk_dim - rope_dim, "qk_rope_head_dim": rope_dim, "v_head_dim": v_dim,
        "routed_scaling_factor": f32(scale) if scale != 0.0 else 1.0,  # llama.cpp: 0 (unset) = no scaling
        "n_group": groups, "topk_group": used, "moe_layer_freq": 1, "attention_bias": False,
    }
    if gating == SIGMOID:
        hf.update(model_type="deepseek_v3", scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=norm,
                  rope_interleave=True)
    else:
        if norm:
            raise GGUFError(f"{meta.path}: softmax routing with {a}.expert_weights_norm = true: moeinfer's "
                            "deepseek_v2 (as transformers) never renormalises the top-k weights")
        hf.update(model_type="deepseek_v2", scoring_func="softmax", norm_topk_prob=False,
                  topk_method="group_limited_greedy" if groups > 1 else "greedy")
    return hf


def split_kv_b(w: torch.Tensor, *, heads: int, nope: int, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj [H*(Dn+Dv), C] -> (k_b [H, C, Dn], v_b [H, Dv, C]), llama.cpp's attn_k_b / attn_v_b."""
    kv = w.reshape(heads, nope + v_dim, w.shape[-1])
    k_b, v_b = kv.split([nope, v_dim], dim=1)
    return k_b.transpose(1, 2).contiguous(), v_b.contiguous()


def merge_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_kv_b`: k_b [H, C, Dn], v_b [H, Dv, C] -> kv_b_proj [H*(Dn+Dv), C]."""
    kv = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # [H, Dn+Dv, C]
    return kv.reshape(-1, kv.shape[-1]).contiguous()


def adjacent_rope_rows(name: str, w: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """A q / kv_a projection with its rotary rows moved from rotate-half to adjacent pairs (for a
    rope_interleave=false model); any other tensor, or an interleaved model's, unchanged."""
    mla = config.mla
    if mla is None or config.rope.interleaved:
        return w
    R, H = mla.qk_rope_head_dim, config.num_heads
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
        heads = w.reshape(H, mla.qk_nope_head_dim + R, -1)
        nope, rope = heads.split([mla.qk_nope_head_dim, R], dim=1)
        rope = permute_qk(rope.reshape(H * R, -1), H).reshape(H, R, -1)
        return torch.cat([nope, rope], dim=1).reshape(w.shape)
    if name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        latent, rope = w.split([mla.kv_lora_rank, R], dim=0)
        return torch.cat([latent, permute_qk(rope, 1)], dim=0)
    return w
