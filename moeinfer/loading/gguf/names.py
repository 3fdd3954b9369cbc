"""moeinfer parameter (and correction-bias buffer) names <-> llama.cpp's GGUF tensor names (gguf-py's
TENSOR_NAMES), and the q/k row order of llama.cpp's `llama` architecture.

GGUF stacks each MoE layer's experts per projection: `blk.{i}.ffn_{gate,up,down}_exps.weight`
with numpy shapes [E, I, D], [E, I, D], [E, D, I] (ggml lists the dimensions reversed); moeinfer's
`experts.gate_up_proj` [E, 2I, D] is the gate rows then the up rows, `experts.down_proj` [E, D, I].
"""

from __future__ import annotations

import re

import torch

_GLOBAL = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    # DeepSeek (MLA, correction bias); kv_b_proj is written as attn_k_b + attn_v_b (deepseek.split_kv_b),
    # attn_kv_b being the name older files hold it under whole
    "self_attn.q_a_proj.weight": "attn_q_a.weight", "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight", "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_GLOBAL_BACK = {v: k for k, v in _GLOBAL.items()}
_OURS = re.compile(r"^layers\.(\d+)\.(.+)$")
_THEIRS = re.compile(r"^blk\.(\d+)\.(.+)$")
EXPERT_PARTS = ("gate", "up", "down")


def to_gguf(name: str) -> str | None:
    """moeinfer parameter name -> GGUF tensor name (None: a name GGUF has no tensor for)."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _OURS.match(name)
    if m and m[2] in _LAYER:
        return f"blk.{m[1]}.{_LAYER[m[2]]}"
    return None


def from_gguf(name: str) -> str | None:
    """GGUF tensor name -> moeinfer parameter name (experts excluded: see `expert_tensor`)."""
    if name in _GLOBAL_BACK:
        return _GLOBAL_BACK[name]
    m = _THEIRS.match(name)
    if m and m[2] in _LAYER_BACK:
        return f"layers.{m[1]}.{_LAYER_BACK[m[2]]}"
    return None


def expert_tensor(layer: int, part: str) -> str:
    """GGUF name of layer `layer`'s stacked expert projection `part` (gate, up or down)."""
    return f"blk.{layer}.ffn_{part}_exps.weight"


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or bias) [n_heads * Dh, ...] from HF's rotate-half order to llama.cpp's
    adjacent pairs: per head, rows (0, Dh/2, 1, Dh/2 + 1, ...). A reordering only: exact."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_qk`."""
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def qk_heads(name: str, num_heads: int, num_kv_heads: int) -> int | None:
    """Heads of a q/k projection parameter (weight or bias) by its moeinfer name, else None."""
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return num_heads
    if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return num_kv_heads
    return None
