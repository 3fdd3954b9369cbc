"""The registries of stored experts kinds and replaced-module kinds (a dict plus a decorator each),
read by `moeinfer.formats.layout` to save and rebuild compressed models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from torch import nn

from moeinfer.config import ModelConfig


class ExpertsKind(Protocol):
    """What a compressed experts module provides to be saved and rebuilt."""

    def layout_params(self) -> dict[str, Any]: ...

    @classmethod
    def empty(cls, num_experts: int, config: ModelConfig, params: dict[str, Any]) -> nn.Module: ...


KINDS: dict[str, type] = {}
MODULE_KINDS: dict[str, type] = {}  # kind -> class with layout_params() and classmethod empty(config, params)


def _registrar(table: dict[str, type], name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        table[name] = cls
        cls.kind = name
        return cls

    return deco


def register_module_kind(name: str) -> Callable[[type], type]:
    """Register a replacement for a non-expert module (e.g. a quantized linear) under `name`."""
    return _registrar(MODULE_KINDS, name)


def register_experts_kind(name: str) -> Callable[[type], type]:
    """Register an experts module class under `name` for layouts (it sets `cls.kind = name`)."""
    return _registrar(KINDS, name)
