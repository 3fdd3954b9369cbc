"""RoPE scaling <-> llama.cpp's `{arch}.rope.*` GGUF keys (linear and YaRN), as far as llama.cpp agrees.

moeinfer's RoPE follows transformers (moeinfer.model.rope; YaRN: Peng et al., 2023). llama.cpp reads
`rope.freq_base`, `rope.scaling.type` ("none", "linear", "yarn"), `rope.scaling.factor`,
`rope.scaling.original_context_length` (YaRN's pre-extension context; default: `context_length`) and,
for `deepseek2` only, `rope.scaling.yarn_log_multiplier` (DeepSeek's mscale_all_dim, stored times 0.1
as llama.cpp's converter writes it). What llama.cpp then computes (llama-context.cpp, ggml's rope):

- every architecture: YaRN's frequency ramp with beta_fast 32 / beta_slow 1 and truncated correction
  dims (transformers' defaults; the beta keys are read by other architectures only), and cos/sin
  scaled by 0.1 ln(factor) + 1 -- transformers' attention factor when the config sets none;
- `deepseek2` (MLA): cos/sin scaled by mscale(factor, m) / mscale(factor, m_all) with m = m_all, and
  the attention logits by mscale(factor, m_all)^2 -- transformers' DeepSeek YaRN exactly when the
  config's `mscale` equals `mscale_all_dim` (DeepSeek's released configs: 0.707/0.707, 1.0/1.0).

Anything else (another beta, attention_factor, GQA with mscale, MLA with linear scaling or unequal
mscales) would run differently in llama.cpp: export refuses it with a GGUFError naming the field.
Import gives back the same config fields (mscale_all_dim from the multiplier, rounded to 6
significant digits, which undoes float32's rounding of any value given with 6 or fewer).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeinfer.config import RopeConfig
from moeinfer.loading.gguf.errors import GGUFError

_DEFAULT_BETA = (32.0, 1.0)  # llama.cpp's yarn_beta_fast / yarn_beta_slow


def f32(value: float) -> float:
    """A float32 key as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def check_rope(rope: RopeConfig, arch: str, *, mla: bool) -> None:
    """Refuse a rope scaling llama.cpp's `arch` would compute differently (see the module docstring)."""
    where = f"rope scaling {rope.type!r} for llama.cpp's {arch!r}"
    if rope.type == "default":
        return
    if rope.type == "linear":
        if mla:
            raise GGUFError(f"{where}: llama.cpp's MLA scales the attention logits under linear scaling too "
                            "(transformers does not); only default and yarn rope are exported for DeepSeek")
        return
    if rope.type != "yarn":
        raise GGUFError(f"{where} has no GGUF keys (supported: default, linear, yarn)")
    if (rope.beta_fast, rope.beta_slow) != _DEFAULT_BETA or not rope.truncate:
        raise GGUFError(f"{where}: beta_fast={rope.beta_fast}, beta_slow={rope.beta_slow}, truncate={rope.truncate}; "
                        f"llama.cpp uses beta_fast={_DEFAULT_BETA[0]}, beta_slow={_DEFAULT_BETA[1]}, truncate=True")
    if rope.attention_factor is not None:
        raise GGUFError(f"{where}: attention_factor={rope.attention_factor} has no GGUF key that llama.cpp applies "
                        "as transformers does")
    if mla:
        if not (rope.mscale and rope.mscale_all_dim and rope.mscale == rope.mscale_all_dim):
            raise GGUFError(f"{where}: mscale={rope.mscale}, mscale_all_dim={rope.mscale_all_dim}; llama.cpp's "
                            "deepseek2 assumes mscale == mscale_all_dim (both set), as DeepSeek's configs have them")
    elif rope.mscale is not None or rope.mscale_all_dim is not None:
        raise GGUFError(f"{where}: mscale={rope.mscale}, mscale_all_dim={rope.mscale_all_dim} are read by llama.cpp "
                        "for deepseek2 only")


def write_rope(writer: Any, arch: str, rope: RopeConfig, *, mla: bool) -> None:
    """`{arch}.rope.freq_base` and the scaling keys (call `check_rope` first)."""
    writer.add_float32(f"{arch}.rope.freq_base", rope.theta)
    if rope.type == "default":
        return
    writer.add_string(f"{arch}.rope.scaling.type", rope.type)
    writer.add_float32(f"{arch}.rope.scaling.factor", rope.factor)
    if rope.type == "yarn":
        if rope.original_max_position_embeddings is not None:
            writer.add_uint32(f"{arch}.rope.scaling.original_context_length", rope.original_max_position_embeddings)
        if mla:
            writer.add_float32(f"{arch}.rope.scaling.yarn_log_multiplier", 0.1 * float(rope.mscale_all_dim or 0.0))


def read_rope(meta: Any, arch: str, *, mla: bool) -> dict[str, Any]:
    """config.json's `rope_parameters` from the keys (`meta`: archmap.Metadata)."""
    out: dict[str, Any] = {"rope_theta": f32(meta.get(f"{arch}.rope.freq_base", 10000.0)), "rope_type": "default"}
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind in ("none", None):
        return out
    if kind not in ("linear", "yarn"):
        raise GGUFError(f"{meta.path}: {arch}.rope.scaling.type {kind!r} is not supported (none, linear, yarn)")
    factor = f32(meta.require(f"{arch}.rope.scaling.factor"))
    out.update(rope_type=kind, factor=factor)
    if kind == "yarn":
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            out["original_max_position_embeddings"] = int(orig)
        log_mul = meta.get(f"{arch}.rope.scaling.yarn_log_multiplier")
        if mla and log_mul:
            m = float(f"{float(log_mul) / 0.1:.6g}")
            out.update(mscale=m, mscale_all_dim=m)
        # llama.cpp's converter copies the config's betas; the model's own values are what it was trained with
        for key, field in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if meta.get(f"{arch}.rope.scaling.{key}") is not None:
                out[field] = f32(meta.get(f"{arch}.rope.scaling.{key}"))
    for key in ("attn_factor", "yarn_attn_factor"):
        value = meta.get(f"{arch}.rope.scaling.{key}")
        if value is not None and float(value) != 1.0:
            raise GGUFError(f"{meta.path}: {arch}.rope.scaling.{key}={value} has no moeinfer equivalent "
                            "(transformers' attention_factor is applied differently)")
    return out
