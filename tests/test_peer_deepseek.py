"""DeepSeek-V2/V3 (MLA + DeepSeekMoE) exact against transformers, plus their config checks.

The peer tests mirror tests/test_peer_transformers.py; every case prints its max |logit diff|
(run with `-s` to see them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import moeinfer
from hf_peers import build_hf_model
from peer_checks import batched_and_alone, greedy_pair, max_logit_diff
from moeinfer.arch import parse_config
from moeinfer.config import ConfigError
from moeinfer.model.kv_cache import KVCache

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
            mscale=1.0, mscale_all_dim=0.5)
LEGACY_YARN = dict(type="yarn", factor=8.0, original_max_position_embeddings=32, mscale=0.707,
                   mscale_all_dim=0.707, beta_fast=16, beta_slow=2)

# (arch, overrides) on top of hf_peers.ARCH_DEFAULTS.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("deepseek_v2", {}),  # greedy top-k, q_proj (no query compression)
    # 3 of 8 experts from the best 2 of 4 groups: the group limit changes the choice
    ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3)),
    # top-k = number of experts: experts of dropped groups are picked with weight 0
    ("deepseek_v2", dict(topk_method="group_limited_greedy", n_routed_experts=4, num_experts_per_tok=4,
                         n_group=2, topk_group=1)),
    # v4-style rope fields, query compression, attention biases
    ("deepseek_v2", dict(q_lora_rank=12, attention_bias=True, rope_theta=5000.0, rope_scaling=LEGACY_YARN)),
    ("deepseek_v3", {}),  # q_lora_rank 12, 2 groups keep 1, non-zero correction bias
    ("deepseek_v3", dict(q_lora_rank=None)),
    ("deepseek_v3", dict(rope_parameters=YARN)),
    ("deepseek_v3", dict(rope_theta=5000.0, rope_scaling=LEGACY_YARN)),
    # top-k = number of experts: experts of dropped groups are picked with their own weights
    ("deepseek_v3", dict(n_routed_experts=6, num_experts_per_tok=6, n_group=3, topk_group=1)),
    # hidden not a multiple of 16, rotate-half rope, no renormalisation, no dense layer, 2 shared experts
    ("deepseek_v3", dict(hidden_size=36, num_attention_heads=3, num_key_value_heads=3, rope_interleave=False,
                         norm_topk_prob=False, first_k_dense_replace=0, n_shared_experts=2)),
]


def _ids(case: tuple[str, dict[str, Any]]) -> str:
    arch, over = case
    short = {k: ("yarn" if isinstance(v, dict) else v) for k, v in over.items()}
    return arch + ("-" + "-".join(f"{k}={v}" for k, v in short.items()) if over else "")


def _save_perturbed(arch: str, path: Path, **overrides: Any):
    """A tiny HF checkpoint whose norm weights and biases are random too (they start at 1 and 0)."""
    model = build_hf_model(arch, **overrides)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.rand(p.shape, generator=g) * 0.4 - 0.2)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=CASES, ids=[_ids(c) for c in CASES])
def pair(request, tmp_path_factory):
    arch, over = request.param
    path = tmp_path_factory.mktemp(arch)
    hf = _save_perturbed(arch, path, **over)
    ours = moeinfer.load(path, dtype=torch.float32, progress=False)
    return _ids(request.param), hf, ours


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_logits_match(pair, left):
    case, hf, ours = pair
    diff = max_logit_diff(hf, ours, left=left)
    print(f"\n{case} {'left' if left else 'right'}-padded: max |logit diff| = {diff:.3g}")
    assert diff <= 1e-4, f"max |logit diff| = {diff}"


@pytest.mark.parametrize("prompt_len", [1, 7])
def test_greedy_generation_matches(pair, prompt_len):
    _, hf, ours = pair
    ref, got = greedy_pair(hf, ours, prompt_len)
    assert got == ref


def test_batched_generation_matches_single(pair):
    """Left-padded batch decoding gives each prompt the tokens it gets alone."""
    for batched, alone in batched_and_alone(pair[2]):
        assert batched == alone


def test_cache_holds_the_latent(pair):
    """MLA caches (kv_lora_rank + qk_rope_head_dim) numbers per token and layer, not per-head K and V."""
    _, _, ours = pair
    mla = ours.config.mla
    cache = KVCache(ours.config, batch_size=2, max_length=10)
    assert cache.nbytes() == ours.config.num_layers * 2 * 10 * (mla.kv_lora_rank + mla.qk_rope_head_dim) * 4


# ---- config parsing ------------------------------------------------------------------------------

def _hf(model_type: str, **over: Any) -> dict[str, Any]:
    hf = dict(model_type=model_type, vocab_size=97, hidden_size=40, num_hidden_layers=3, num_attention_heads=4,
              intermediate_size=56, moe_intermediate_size=20, n_routed_experts=8, num_experts_per_tok=2,
              n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_group=2, topk_group=1)
    hf.update(over)
    return {k: v for k, v in hf.items() if v is not ...}


def test_parse_v2():
    cfg = parse_config(_hf("deepseek_v2", topk_method="group_limited_greedy", norm_topk_prob=True,
                           routed_scaling_factor=16.0))
    assert cfg.attention == "mla" and cfg.mla.q_lora_rank is None and cfg.head_dim == 12
    assert cfg.layer_ffn == ("dense", "moe", "moe") and cfg.shared_intermediate_size == 20
    r = cfg.router
    assert (r.score_func, r.n_group, r.topk_group, r.group_score, r.scaling) == ("softmax", 2, 1, "max", 16.0)
    assert not r.norm_topk_prob and not r.correction_bias  # transformers ignores V2's norm_topk_prob
    assert cfg.rope.interleaved
    greedy = parse_config(_hf("deepseek_v2", topk_method="greedy")).router
    assert (greedy.n_group, greedy.topk_group) == (1, 1)


def test_parse_v3():
    cfg = parse_config(_hf("deepseek_v3", q_lora_rank=12, n_shared_experts=0, rope_interleave=False,
                           num_local_experts=8, n_routed_experts=...))
    r = cfg.router
    assert (r.score_func, r.group_score, r.correction_bias, r.norm_topk_prob) == ("sigmoid", "top2_sum", True, True)
    assert r.scaling == 2.5 and r.num_experts == 8  # transformers' defaults for absent fields
    assert cfg.shared_intermediate_size == 0 and not cfg.rope.interleaved and cfg.mla.q_lora_rank == 12


def test_parse_v4_rope_fields_equal_v5():
    v4 = parse_config(_hf("deepseek_v3", rope_theta=5000.0, rope_scaling=LEGACY_YARN)).rope
    v5 = {k: v for k, v in LEGACY_YARN.items() if k != "type"}
    assert v4 == parse_config(_hf("deepseek_v3", rope_parameters=dict(v5, rope_type="yarn", rope_theta=5000.0))).rope
    assert v4.mscale_all_dim == 0.707 and v4.interleaved


@pytest.mark.parametrize("model_type, over, field", [
    ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method"),
    ("deepseek_v2", dict(scoring_func="sigmoid"), "scoring_func"),
    ("deepseek_v3", dict(topk_method="greedy"), "topk_method"),
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func"),
    ("deepseek_v3", dict(hidden_act="gelu"), "hidden_act"),
    ("deepseek_v2", dict(moe_layer_freq=2), "moe_layer_freq"),
    ("deepseek_v2", dict(mlp_bias=True), "mlp_bias"),
    ("deepseek_v3", dict(num_key_value_heads=2), "num_key_value_heads"),
    ("deepseek_v3", dict(q_lora_rank=...), "q_lora_rank"),
    ("deepseek_v3", dict(n_group=8), "n_group"),
    ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=None), "n_group"),
    ("deepseek_v3", dict(n_routed_experts=..., num_local_experts=...), "n_routed_experts"),
])
def test_unsupported_values_name_the_field(model_type, over, field):
    with pytest.raises(ConfigError, match=field):
        parse_config(_hf(model_type, **over))


def test_unsupported_value_lists_the_choices():
    with pytest.raises(ConfigError, match="greedy.*group_limited_greedy"):
        parse_config(_hf("deepseek_v2", topk_method="noaux_tc"))
