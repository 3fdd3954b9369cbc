"""Package hygiene: importing moeinfer has no side effects; optional dependencies fail clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest

import moeinfer


def test_import_touches_no_gpu_and_no_optional_dependency():
    code = ("import sys, moeinfer, torch; from moeinfer import load, save, generate, Generation, MoEModel; "
            "heavy = [m for m in ('transformers', 'triton', 'fastapi', 'matplotlib') if m in sys.modules]; "
            "print(heavy, torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] False"


def test_public_api():
    """Each public name is the object its defining module exports (not a stub or a stale alias), and the
    entry points are callable with the keyword options the docs promise."""
    import importlib
    import inspect

    from moeinfer import _LAZY

    assert set(moeinfer.__all__) == set(_LAZY) | {"__version__"}
    for name, module in _LAZY.items():
        assert getattr(moeinfer, name) is getattr(importlib.import_module(module), name), name
        assert callable(getattr(moeinfer, name)), name
    assert moeinfer.__version__.count(".") == 2
    load, save = inspect.signature(moeinfer.load).parameters, inspect.signature(moeinfer.save).parameters
    assert {"device", "dtype", "check_weights"} <= {n for n, p in load.items() if p.kind is p.KEYWORD_ONLY}
    assert save["overwrite"].kind is inspect.Parameter.KEYWORD_ONLY and save["overwrite"].default is False
    with pytest.raises(AttributeError):
        moeinfer.not_a_thing  # noqa: B018


def test_missing_optional_dependency_message():
    from moeinfer._optional import require

    with pytest.raises(ImportError, match=r"fused kernels needs the optional package 'triton_nope'.*pip install"):
        require("triton_nope", "fused kernels")
    assert require("json", "x").dumps([]) == "[]"
