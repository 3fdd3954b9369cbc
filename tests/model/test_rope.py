"""RoPE inverse frequencies and attention factors equal transformers' (`ROPE_INIT_FUNCTIONS`).

The configs go through `moeinfer.arch.common.rope_config`, so both spellings of the rope fields
(v5 `rope_parameters`, v4 `rope_theta` + `rope_scaling`) are covered too.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moeinfer.arch.common import rope_config
from moeinfer.model.rope import inverse_frequencies

MAX_POS = 4096

CASES: list[tuple[int, dict[str, Any]]] = [
    (64, dict(rope_type="default", rope_theta=10000.0)),
    (16, dict(rope_type="default", rope_theta=1e6)),
    (64, dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    (64, dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096)),
    (64, dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
              beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),  # DeepSeek-V3
    (64, dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
              mscale=0.707, mscale_all_dim=0.707)),  # DeepSeek-V2
    (32, dict(rope_type="yarn", rope_theta=50000.0, factor=8.0, original_max_position_embeddings=512,
              mscale=1.0, mscale_all_dim=0.5, truncate=False)),
    (16, dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=1024,
              mscale=1.0, truncate=True)),  # mscale without mscale_all_dim: factor-only attention factor
    (16, dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=1024,
              beta_fast=16, beta_slow=2, truncate=False)),
    (16, dict(rope_type="yarn", rope_theta=10000.0, factor=2.0, original_max_position_embeddings=1024,
              attention_factor=1.25)),
    (8, dict(rope_type="yarn", rope_theta=10000.0, factor=0.5, original_max_position_embeddings=1024)),
    # factor null: max_position_embeddings / original_max_position_embeddings
    (16, dict(rope_type="yarn", rope_theta=10000.0, factor=None, original_max_position_embeddings=1024)),
]


def _hf_config(dim: int, params: dict[str, Any]):
    from transformers import DeepseekV3Config

    # DeepSeek's config sets head_dim = qk_rope_head_dim, the dim transformers' rope functions read.
    return DeepseekV3Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=dim, qk_nope_head_dim=8,
                            max_position_embeddings=MAX_POS, rope_parameters=dict(params))


def _reference(dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    config = _hf_config(dim, params)
    if params["rope_type"] == "default":
        return DeepseekV3RotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config)


def _ids(case: tuple[int, dict[str, Any]]) -> str:
    dim, params = case
    return f"dim{dim}-" + "-".join(f"{k}={v}" for k, v in params.items() if k != "rope_theta")


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_inverse_frequencies_match_transformers(case, spelling):
    dim, params = case
    ref_inv_freq, ref_factor = _reference(dim, params)
    if spelling == "rope_parameters":
        hf = dict(model_type="deepseek_v3", max_position_embeddings=MAX_POS, rope_parameters=dict(params))
    else:  # transformers v4 layout: theta at top level, scaling dict keyed by "type"
        scaling = {("type" if k == "rope_type" else k): v for k, v in params.items() if k != "rope_theta"}
        hf = dict(model_type="deepseek_v3", max_position_embeddings=MAX_POS, rope_theta=params["rope_theta"],
                  rope_scaling=None if params["rope_type"] == "default" else scaling)
    inv_freq, factor = inverse_frequencies(rope_config(hf), dim, MAX_POS)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == ref_inv_freq.shape
    torch.testing.assert_close(inv_freq, ref_inv_freq.float(), rtol=0, atol=0)
    assert factor == pytest.approx(float(ref_factor), rel=1e-12)



def test_one_forward_computes_cos_sin_once_for_all_layers(tiny_fp32, monkeypatch):
    """The per-forward memo: the first layer's cos/sin serve every other layer, each forward anew
    (a memo kept across forwards would hand a later step the positions of an earlier one)."""
    from moeinfer.model.rope import RotaryEmbedding

    calls = []
    original = RotaryEmbedding.cos_sin

    def counting(self, positions, dtype, memo=None):
        out = original(self, positions, dtype, memo)
        calls.append((positions.tolist(), out[0]))
        return out

    ids = torch.arange(3, 12).reshape(1, -1)
    with torch.no_grad():
        want = tiny_fp32(ids)
        monkeypatch.setattr(RotaryEmbedding, "cos_sin", counting)
        got = tiny_fp32(ids)
        assert torch.equal(got, want)
        assert len(calls) == tiny_fp32.config.num_layers
        assert all(c[1] is calls[0][1] for c in calls)  # one tensor shared by all layers
        tiny_fp32(ids[:, :4])
        assert calls[-1][0] == [list(range(4))] and calls[-1][1].shape[1] == 4
