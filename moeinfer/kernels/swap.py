"""The class swap behind `use_cpu_linears_`, `use_cpu_norms_`, `use_cpu_rope_` and
`use_cpu_attention_`: the eligible modules of one eager class become its native subclass in place
(same parameters, same state dict; the subclass's forward decides per call whether its native op
applies, else runs the eager reference), and back again."""

from __future__ import annotations

from typing import Callable

from torch import nn

from moeinfer.kernels import native


def swap_in_(model: nn.Module, base: type[nn.Module], native_cls: type[nn.Module], what: str, *,
             eligible: Callable[[nn.Module], bool] = lambda m: True, engine: str | None = None) -> int:
    """Every module of exactly type `base` that is `eligible` becomes a `native_cls`; returns how many.
    A `native_cls` with an `engine` attribute gets `engine` (None: the best variant). RuntimeError
    naming `what` and the reason when the native library is unavailable; ValueError when `engine` names
    a variant this CPU cannot run."""
    why = native.unavailable_reason()
    if why is not None:
        raise RuntimeError(f"{what}: native kernels unavailable: {why}")
    if engine is not None:
        native.resolve_variant(engine)
    count = 0
    for module in model.modules():
        if type(module) is base and eligible(module):
            module.__class__ = native_cls
            count += 1
        if isinstance(module, native_cls) and hasattr(native_cls, "engine"):
            module.engine = engine
    return count


def swap_out_(model: nn.Module, native_cls: type[nn.Module], base: type[nn.Module]) -> int:
    """Undo `swap_in_`: every `native_cls` module becomes a `base` again; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, native_cls):
            module.__class__ = base
            module.__dict__.pop("engine", None)
            count += 1
    return count
