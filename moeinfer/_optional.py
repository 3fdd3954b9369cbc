"""Optional dependencies, imported only when a feature needs them, with a message saying how to get them."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"transformers": "test", "triton": "kernels", "fastapi": "serve", "uvicorn": "serve", "matplotlib": "bench"}


def require(module: str, feature: str) -> ModuleType:
    """Import `module` or raise ImportError naming the feature that needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS.get(module.split(".")[0])
        hint = f"pip install 'moeinfer[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        raise ImportError(f"{feature} needs the optional package {module!r}, which is not installed: {hint}") from e
