from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported: tests/test_gpu_paths.py runs the Triton kernels in its
    # CPU interpreter, and a test module collected before it may import Triton first
    os.environ.setdefault("TRITON_INTERPRET", "1")

import moeinfer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A temporary folder shared by the tests of one module (checkpoints they build once)."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


def _load_tiny() -> torch.nn.Module:
    return moeinfer.load("tiny", dtype=torch.float32, progress=False)


@pytest.fixture
def tiny_fp32() -> torch.nn.Module:
    """The shipped reference model (moeinfer-tiny) in fp32, fresh for each test (tests may change it)."""
    return _load_tiny()


@pytest.fixture(scope="module")
def tiny_fp32_shared() -> torch.nn.Module:
    """The shipped reference model in fp32, one per test module: for tests that only read it."""
    return _load_tiny()
