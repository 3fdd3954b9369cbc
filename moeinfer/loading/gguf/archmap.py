"""moeinfer's model families <-> llama.cpp's GGUF architectures and their metadata keys.

GGUF describes a model by `general.architecture` and keys named `{arch}.{field}` (llama.cpp's
gguf-py `Keys`, read by llama.cpp's `load_arch_hparams`). Export writes the keys llama.cpp reads for
the family; import rebuilds from them the config.json fields moeinfer's architecture adapters parse,
so one parser (moeinfer.arch) serves both checkpoint kinds.

    moeinfer model_type   GGUF arch   notes (llama.cpp's behaviour, hard-wired per arch)
    mixtral               llama       experts inside llama; q/k rows permuted for its interleaved RoPE
    qwen2_moe             qwen2moe    shared expert with a sigmoid gate; top-k weights not renormalised
    qwen3_moe             qwen3moe    per-head q/k RMSNorm; top-k weights renormalised
    olmoe                 olmoe       q/k RMSNorm over the full projection; not renormalised
    deepseek_v2 / v3      deepseek2   MLA with kv_b split into k_b/v_b; leading dense layers, shared
                                      experts, groups, sigmoid + correction bias (moeinfer.loading.gguf.deepseek)

RoPE scaling (linear, YaRN) goes through moeinfer.loading.gguf.ropekeys. None of these llama.cpp
architectures reads a sliding-window key, so a model with one is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moeinfer.config import ModelConfig
from moeinfer.loading.gguf import deepseek
from moeinfer.loading.gguf.errors import GGUFError
from moeinfer.loading.gguf.ropekeys import check_rope, f32, read_rope, write_rope


@dataclass(frozen=True)
class Family:
    """One moeinfer family as llama.cpp knows it."""

    model_type: str
    arch: str
    permute_qk: bool  # llama.cpp applies RoPE to adjacent pairs; HF's rotate-half needs q/k rows reordered
    norm_topk: bool  # llama.cpp renormalises the top-k weights for this arch (not configurable there)


FAMILIES = {f.model_type: f for f in (
    Family("mixtral", "llama", permute_qk=True, norm_topk=True),
    Family("qwen2_moe", "qwen2moe", permute_qk=False, norm_topk=False),
    Family("qwen3_moe", "qwen3moe", permute_qk=False, norm_topk=True),
    Family("olmoe", "olmoe", permute_qk=False, norm_topk=False),
    Family("deepseek_v2", deepseek.ARCH, permute_qk=False, norm_topk=False),
    Family("deepseek_v3", deepseek.ARCH, permute_qk=False, norm_topk=True),
)}
BY_ARCH = {f.arch: f for f in FAMILIES.values()}  # deepseek2: v2 or v3 is decided by the gating function


def family_for_export(config: ModelConfig) -> Family:
    if config.model_type not in FAMILIES:
        raise GGUFError(f"model_type {config.model_type!r} cannot be exported to GGUF yet; supported: "
                        f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[config.model_type]


def family_for_import(arch: str, path: str) -> Family:
    if arch not in BY_ARCH:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                        f"{', '.join(sorted(BY_ARCH))} (moeinfer runs Mixture-of-Experts models only)")
    return BY_ARCH[arch]


def check_exportable(config: ModelConfig, family: Family, num_experts: int) -> list[str]:
    """Refuse what llama.cpp cannot express for the family; return notes on what it will read differently."""
    notes: list[str] = []
    if config.sliding_window is not None and any(w is not None for w in config.sliding_window):
        raise GGUFError(f"{config.model_type}: sliding-window attention: llama.cpp's {family.arch!r} architecture "
                        "reads no sliding-window key (it would attend over the full context)")
    check_rope(config.rope, family.arch, mla=config.attention == "mla")
    if num_experts < config.router.top_k:
        raise GGUFError(f"{num_experts} experts per layer cannot serve top_k={config.router.top_k}")
    if family.arch == deepseek.ARCH:
        return notes + deepseek.check(config)
    if any(kind != "moe" for kind in config.layer_ffn):
        dense = [i for i, k in enumerate(config.layer_ffn) if k != "moe"]
        raise GGUFError(f"{config.model_type}: dense FFN layers {dense}"
                        f" have no place in llama.cpp's {family.arch!r} architecture (every layer is MoE there)")
    r = config.router
    if r.score_func != "softmax" or r.n_group != 1 or r.scaling != 1.0 or r.correction_bias:
        raise GGUFError(f"{config.model_type}: a router with {r.score_func} scores, {r.n_group} groups or scaling "
                        f"{r.scaling} has no equivalent in llama.cpp's {family.arch!r} architecture")
    if r.norm_topk_prob != family.norm_topk:
        notes.append(f"norm_topk_prob={r.norm_topk_prob} is written as {family.arch}.expert_weights_norm, but "
                     f"llama.cpp's "
                     f"{family.arch!r} always uses {family.norm_topk}: llama.cpp's top-k weights will differ")
    if config.clip_qkv is not None and family.arch != "olmoe":
        raise GGUFError(f"clip_qkv has no GGUF key for llama.cpp's {family.arch!r} architecture")
    return notes


def write_metadata(writer: Any, config: ModelConfig, family: Family, *, num_experts: int) -> None:
    """The {arch}.* keys llama.cpp reads for the family (names as in llama.cpp's gguf-py Keys)."""
    a = family.arch
    w = writer
    if a == deepseek.ARCH:
        deepseek.write_metadata(w, config, num_experts=num_experts)
        write_rope(w, a, config.rope, mla=True)
        return
    w.add_uint32(f"{a}.vocab_size", config.vocab_size)
    w.add_uint32(f"{a}.context_length", config.max_position_embeddings)
    w.add_uint32(f"{a}.embedding_length", config.hidden_size)
    w.add_uint32(f"{a}.block_count", config.num_layers)
    w.add_uint32(f"{a}.feed_forward_length",
                 config.moe_intermediate_size if a in ("llama", "olmoe") else config.intermediate_size)
    if a in ("qwen2moe", "qwen3moe"):
        w.add_uint32(f"{a}.expert_feed_forward_length", config.moe_intermediate_size)
    if a == "qwen2moe" and config.shared_intermediate_size:
        w.add_uint32(f"{a}.expert_shared_feed_forward_length", config.shared_intermediate_size)
    w.add_uint32(f"{a}.attention.head_count", config.num_heads)
    w.add_uint32(f"{a}.attention.head_count_kv", config.num_kv_heads)
    w.add_uint32(f"{a}.attention.key_length", config.head_dim)
    w.add_uint32(f"{a}.attention.value_length", config.head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    if config.clip_qkv is not None:
        w.add_float32(f"{a}.attention.clamp_kqv", config.clip_qkv)
    w.add_uint32(f"{a}.rope.dimension_count", config.head_dim)
    write_rope(w, a, config.rope, mla=False)
    w.add_uint32(f"{a}.expert_count", num_experts)
    w.add_uint32(f"{a}.expert_used_count", config.router.top_k)
    w.add_bool(f"{a}.expert_weights_norm", config.router.norm_topk_prob)


class Metadata:
    """Typed access to a GGUF file's keys, with errors that name the file and the key."""

    def __init__(self, fields: dict[str, Any], path: str) -> None:
        self.fields, self.path = fields, path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:  # a corrupt value: gguf raises whatever numpy raised
            raise GGUFError(f"{self.path}: metadata key {key!r} cannot be read: {e}") from e

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
        return value

    def int(self, key: str, default: int | None = None) -> int:
        value = self.require(key) if default is None else self.get(key, default)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise GGUFError(f"{self.path}: metadata key {key!r} must be an integer, got {value!r}")
        return int(value)


def hf_config(meta: Metadata, family: Family, *, has_output: bool, has_qkv_bias: bool,
              has_o_bias: bool) -> dict[str, Any]:
    """config.json fields for moeinfer.arch's parser of the family, from the GGUF keys."""
    a = family.arch
    hidden, heads = meta.int(f"{a}.embedding_length"), meta.int(f"{a}.attention.head_count")
    experts = meta.int(f"{a}.expert_count", 0)
    if experts < 1:
        raise GGUFError(f"{meta.path}: {a}.expert_count is {experts}: not a Mixture-of-Experts model")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.int(f"{a}.vocab_size", len(tokens) if tokens is not None else 0)
    if vocab < 1:
        raise GGUFError(f"{meta.path}: neither {a}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    mla = a == deepseek.ARCH
    rope = read_rope(meta, a, mla=mla)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    hf: dict[str, Any] = {
        "model_type": family.model_type, "architectures": [None], "hidden_act": "silu",
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": meta.int(f"{a}.block_count"),
        "num_attention_heads": heads, "num_key_value_heads": meta.int(f"{a}.attention.head_count_kv", heads),
        "head_dim": meta.int(f"{a}.attention.key_length", hidden // heads),
        "rms_norm_eps": f32(meta.require(f"{a}.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": meta.int(f"{a}.context_length", 4096),
        "rope_parameters": rope, "tie_word_embeddings": not has_output,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "num_experts_per_tok": meta.int(f"{a}.expert_used_count"),
        "norm_topk_prob": bool(meta.get(f"{a}.expert_weights_norm", family.norm_topk)),
    }
    ff = meta.int(f"{a}.feed_forward_length")
    if mla:  # MLA's head sizes and DeepSeek's router: its own keys; key_length is the latent's there
        del hf["head_dim"]
        hf.update(deepseek.hf_fields(meta), num_key_value_heads=heads)
    elif family.model_type == "mixtral":
        hf.update(intermediate_size=ff, num_local_experts=experts, sliding_window=None)
    elif family.model_type == "olmoe":
        clip = meta.get(f"{a}.attention.clamp_kqv")
        hf.update(intermediate_size=ff, num_experts=experts, attention_bias=has_qkv_bias,
                  clip_qkv=None if clip is None else f32(clip))
    else:
        moe_ff = meta.int(f"{a}.expert_feed_forward_length")
        hf.update(intermediate_size=ff, moe_intermediate_size=moe_ff, num_experts=experts)
        if family.model_type == "qwen2_moe":
            hf.update(qkv_bias=has_qkv_bias,
                      shared_expert_intermediate_size=meta.int(f"{a}.expert_shared_feed_forward_length", 0))
        else:
            hf.update(attention_bias=has_qkv_bias or has_o_bias)
    hf["architectures"] = [_HF_CLASS[hf["model_type"]]]
    return hf


_HF_CLASS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
             "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
             "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
