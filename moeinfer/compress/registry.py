"""The registry of compression methods: a dict plus a decorator.

A method is a function `fn(model, params, calib) -> summary` that changes `model` in place, with a
dataclass of parameters (validated in its `__post_init__`) and a statement of the calibration it
needs: "none", "routing" (expert frequencies and gate weights: a text or a routing trace) or
"activations" (inputs of every MoE layer: a text).
"""

from __future__ import annotations

import dataclasses
import types
import typing
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
        hints = typing.get_type_hints(self.params)
        for key, value in raw.items():
            if not _matches(value, hints.get(key, Any)):
                raise CompressionError(f"{where}method {self.name!r}: parameter {key} must be "
                                       f"{_type_name(hints[key])}, got {value!r:.60}")
        try:
            return self.params(**raw)
        except (TypeError, ValueError) as e:
            raise CompressionError(f"{where}method {self.name!r}: {e}") from None


def _matches(value: Any, hint: Any) -> bool:
    """Does a recipe value (parsed YAML/JSON) fit a params field's annotation? Plain types, X | None,
    Literal, list/tuple/set/dict of them; anything more exotic is left to the dataclass's own checks."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, set):
        if not isinstance(value, (list, tuple, set)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


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
