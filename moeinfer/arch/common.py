"""Config fields shared by the architectures, with checks of values moeinfer does not handle."""

from __future__ import annotations

from typing import Any

from moeinfer.config import ConfigError, RopeConfig


def require(hf: dict[str, Any], key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ConfigError(f"config.json ({hf.get('model_type')}) lacks the field {key!r}")
    return hf[key]


def require_any(hf: dict[str, Any], *keys: str) -> Any:
    """The first of several names a field has had across transformers versions."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    raise ConfigError(f"config.json ({hf.get('model_type')}) lacks the field {keys[0]!r} "
                      f"(also looked for {', '.join(map(repr, keys[1:]))})")


def check_value(hf: dict[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> Any:
    value = hf.get(key, default)
    if value is None:
        value = default
    if value not in allowed:
        raise ConfigError(
            f"config.json field {key}={value!r} is not supported for {hf.get('model_type')}; "
            f"supported: {', '.join(map(repr, allowed))}"
        )
    return value


def rope_config(hf: dict[str, Any], *, interleaved: bool = False) -> RopeConfig:
    """Reads transformers v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"config.json field partial_rotary_factor={partial} is not supported (only 1.0)")
    kwargs: dict[str, Any] = {}
    for key in ("original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                "attention_factor", "truncate"):
        if params.get(key) is not None:
            kwargs[key] = params[key]
    factor = params.get("factor", 1.0)
    if rope_type == "yarn" and factor is None:
        factor = hf["max_position_embeddings"] / kwargs["original_max_position_embeddings"]
    return RopeConfig(theta=float(theta), type=rope_type, factor=float(factor or 1.0),
                      interleaved=interleaved, **kwargs)


def common_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Fields every supported architecture reads the same way."""
    check_value(hf, "hidden_act", ("silu",), "silu")
    hidden = int(require(hf, "hidden_size"))
    heads = int(require(hf, "num_attention_heads"))
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return dict(
        model_type=hf["model_type"],
        vocab_size=int(require(hf, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(require(hf, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
        hf_config=dict(hf),
    )


def sliding_windows(hf: dict[str, Any], num_layers: int, default_on: bool) -> tuple[int | None, ...] | None:
    """Per-layer attention windows from `layer_types` or the family's sliding_window fields."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if types:
        if len(types) != num_layers:
            raise ConfigError(f"config.json layer_types has {len(types)} entries for {num_layers} layers")
        bad = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
        if bad:
            raise ConfigError(f"config.json layer_types {bad} not supported; supported: full_attention, "
                              "sliding_attention")
        if "sliding_attention" not in types:
            return None
        return tuple(int(window) if t == "sliding_attention" and window else None for t in types)
    if default_on and window:
        return tuple(int(window) for _ in range(num_layers))
    return None
