"""Architecture adapters: one file per model family, registered by `model_type`.

An adapter turns a checkpoint's config.json into a `ModelConfig` and names the checkpoint's
tensors (so `moeinfer.loading` can map them onto the one eager model and back).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moeinfer.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class ArchSpec:
    """What differs between families once the model itself is shared.

    `renames` are (checkpoint substring, moeinfer substring) pairs applied to tensor names;
    `expert_names` are the per-expert (gate, up, down) projection names in the checkpoint.
    """

    model_type: str
    hf_class: str
    parse: Callable[[dict[str, Any]], ModelConfig]
    renames: tuple[tuple[str, str], ...] = ()
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    ignore_prefixes: tuple[str, ...] = ()


ARCHITECTURES: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    ARCHITECTURES[spec.model_type] = spec
    return spec


def _ensure_registered() -> None:
    if not ARCHITECTURES:
        # Imported here: the adapters register themselves here when imported (circular at module level).
        from moeinfer.arch import deepseek, mixtral, olmoe, qwen_moe  # noqa: F401


def supported_model_types() -> list[str]:
    _ensure_registered()
    return sorted(ARCHITECTURES)


def get_arch(model_type: str | None) -> ArchSpec:
    _ensure_registered()
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def parse_config(hf: dict[str, Any]) -> ModelConfig:
    """config.json dict -> ModelConfig, via the adapter named by its model_type."""
    return get_arch(hf.get("model_type")).parse(hf)
