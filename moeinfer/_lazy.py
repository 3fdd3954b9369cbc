"""Lazy package exports (PEP 562): a package's `__getattr__` that imports a name's module on first use,
so `import moeinfer.x` stays light (no torch.distributed, triton or server stack until asked for)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """`__getattr__ = lazy_exports(__name__, {name: module})`: `package.name` imports `module` then."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
