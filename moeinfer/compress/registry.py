"""The registry of compression methods: a dict plus a decorator.

A method is a function `fn(model, params, calib) -> summary` that changes `model` in place, with a
dataclass of parameters (validated in its `__post_init__`) and a statement of the calibration it
needs: "none", "routing" (expert frequencies and gate weights: a text or a routing trace) or
"activations" (inputs of every MoE layer: a text).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from moeinfer.compress.presets import PRESETS
from moeinfer.formats.errors import CompressionError

__all__ = ["CompressionError", "Method", "METHODS", "register_method", "get_method", "available_methods"]

Needs = Literal["none", "routing", "activations"]
MethodFn = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    params: type
    needs: Needs

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip()

    def make_params(self, raw: dict[str, Any] | None, where: str = "") -> Any:
        """Recipe parameters -> the method's params dataclass; unknown or bad fields name the step."""
        raw = dict(raw or {})
        known = {f.name for f in dataclasses.fields(self.params)}
        bad = sorted(set(raw) - known)
        if bad:
            raise CompressionError(f"{where}method {self.name!r} has no parameter(s) {', '.join(bad)}; "
                                   f"its parameters: {', '.join(sorted(known)) or '(none)'}")
        try:
            return self.params(**raw)
        except (TypeError, ValueError) as e:
            raise CompressionError(f"{where}method {self.name!r}: {e}") from None


METHODS: dict[str, Method] = {}


def register_method(name: str, *, params: type, needs: Needs = "none") -> Callable[[MethodFn], MethodFn]:
    """Register `fn` as compression method `name` (a recipe step's `method`)."""
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"params of method {name!r} must be a dataclass")

    def deco(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise ValueError(f"compression method {name!r} is registered twice")
        METHODS[name] = Method(name, fn, params, needs)
        return fn

    return deco


def _ensure_registered() -> None:
    import importlib
    import pkgutil

    # Imported here: the method modules register themselves here when imported (circular at module level).
    import moeinfer.compress.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


def get_method(name: str) -> Method:
    _ensure_registered()
    if name not in METHODS:
        raise CompressionError(f"unknown compression method {name!r}; methods: {', '.join(sorted(METHODS))}; "
                               f"named recipes: {', '.join(PRESETS)}")
    return METHODS[name]


def available_methods() -> list[str]:
    _ensure_registered()
    return sorted(METHODS)
