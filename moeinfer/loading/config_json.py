"""Reading a checkpoint's JSON files (config.json, the shard index, tokenizer_config.json) with named errors.

Every value the loader later turns into a size, a count or a path is checked here first, against the
JSON type it must have, so that a wrong file gives one sentence naming the file, the field and what is
wrong instead of a TypeError deep in model construction:
1. `read_json`: the file is UTF-8, valid JSON (nesting deep enough to exhaust the parser's recursion is
   an error too), and of the expected top-level type;
2. `check_config_fields`: config.json's size fields are integers (an integral float such as 1e9 counts)
   in their allowed range, model_type is a string, token ids are integers;
3. `check_weight_map`: the index maps tensor names (strings) to shard files (strings) that stay inside
   the checkpoint directory (no absolute paths, no `..`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath
from typing import Any

from moeinfer.config import ConfigError
from moeinfer.loading.errors import CheckpointError

# config.json size fields: must be integers >= 1 when present (and not null)
POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "intermediate_size", "moe_intermediate_size", "num_local_experts", "num_experts",
                 "n_routed_experts", "num_experts_per_tok", "max_position_embeddings", "kv_lora_rank",
                 "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group",
                 "decoder_sparse_step", "moe_layer_freq", "original_max_position_embeddings")
NON_NEGATIVE_INTS = ("sliding_window", "first_k_dense_replace", "n_shared_experts", "shared_expert_intermediate_size",
                     "max_window_layers", "bos_token_id", "pad_token_id")
# Dimensions that size real (not meta) buffers when the model is built, e.g. RoPE's inverse frequencies;
# the largest head dimension of any released model is 512.
MAX_HEAD_DIM = 1 << 16
HEAD_DIMS = ("head_dim", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")
# Counts the adapters turn into per-layer / per-expert Python objects; the loader also checks them against
# the number of tensors in the files, this cap protects readers of config.json alone.
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")
MAX_COUNT = 1 << 20


def parse_json(raw: bytes, where: str | Path) -> Any:
    """bytes -> JSON value; a CheckpointError naming `where` for non-UTF-8, invalid or too deeply nested JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where} is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where} is not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{where} nests JSON too deeply to be parsed; not a valid file") from None


def read_json(path: Path, *, expect: type = dict) -> Any:
    """Read a JSON file that must hold a value of type `expect` (a JSON object by default)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from None
    value = parse_json(raw, path)
    if not isinstance(value, expect):
        kind = {dict: "a JSON object", list: "a JSON array"}.get(expect, expect.__name__)
        raise CheckpointError(f"{path} must hold {kind}, not {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def as_int(value: Any, field: str, where: str | Path, *, minimum: int) -> int:
    """A JSON integer (or integral float like 1e9) >= minimum, else a ConfigError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {field} must be an integer, got {_json_type(value)} {value!r:.60}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ConfigError(f"{where}: {field} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}: {field} must be >= {minimum}, got {value!r}")
    return int(value)


def check_config_fields(hf: dict[str, Any], where: str | Path) -> None:
    """Check the types and ranges of config.json's fields that moeinfer reads; see the module docstring."""
    model_type = hf.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError(f"{where}: model_type must be a string naming the architecture, got "
                          f"{_json_type(model_type)} {model_type!r:.60}")
    for fields, minimum in ((POSITIVE_INTS, 1), (NON_NEGATIVE_INTS, 0)):
        for field in fields:
            if hf.get(field) is not None:
                as_int(hf[field], field, where, minimum=minimum)
    for field in HEAD_DIMS:
        if hf.get(field) is not None and hf[field] > MAX_HEAD_DIM:
            raise ConfigError(f"{where}: {field}={hf[field]!r} is implausibly large (at most {MAX_HEAD_DIM})")
    for field in ("num_hidden_layers", *EXPERT_COUNTS):
        if hf.get(field) is not None and hf[field] > MAX_COUNT:
            raise ConfigError(f"{where}: {field}={hf[field]!r} is implausibly large (at most {MAX_COUNT})")
    eos = hf.get("eos_token_id")
    for i, token in enumerate(eos if isinstance(eos, list) else [] if eos is None else [eos]):
        as_int(token, "eos_token_id" + (f"[{i}]" if isinstance(eos, list) else ""), where, minimum=0)
    for field in POSITIVE_FLOATS:
        value = hf.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ConfigError(f"{where}: {field} must be a positive number, got {value!r:.60}")
    for field in ("rope_scaling", "rope_parameters"):
        if hf.get(field) is not None and not isinstance(hf[field], dict):
            raise ConfigError(f"{where}: {field} must be an object or null, got {_json_type(hf[field])}")
    for field in ("mlp_only_layers", "layer_types"):
        if hf.get(field) is not None and not isinstance(hf[field], list):
            raise ConfigError(f"{where}: {field} must be an array, got {_json_type(hf[field])}")


def check_weight_map(index: Any, path: Path) -> dict[str, str]:
    """The index's weight_map, checked: tensor name -> shard file name inside the checkpoint directory."""
    if not isinstance(index, dict) or "weight_map" not in index:
        raise CheckpointError(f"{path} is not a valid safetensors index: it needs a \"weight_map\" object")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: weight_map must be an object {{tensor name: shard file}}, "
                              f"not {_json_type(weight_map)}")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CheckpointError(f"{path}: weight_map[{name!r}] must be a shard file name, "
                                  f"got {_json_type(file)} {file!r:.60}")
        parts = PurePosixPath(file).parts
        if file.startswith(("/", "\\")) or ".." in parts or "\\" in file or ":" in file or "\0" in file:
            raise CheckpointError(f"{path}: weight_map[{name!r}] = {file!r} leaves the checkpoint directory; "
                                  "shard files must be plain names inside it")
    return weight_map
