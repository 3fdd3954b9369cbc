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
    for name in moeinfer.__all__:
        assert getattr(moeinfer, name) is not None
    with pytest.raises(AttributeError):
        moeinfer.not_a_thing  # noqa: B018


def test_missing_optional_dependency_message():
    from moeinfer._optional import require

    with pytest.raises(ImportError, match=r"fused kernels needs the optional package 'triton_nope'.*pip install"):
        require("triton_nope", "fused kernels")
    assert require("json", "x").dumps([]) == "[]"
