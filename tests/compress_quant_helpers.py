"""Shared helpers of the quantization / low-rank tests: tiny random models and their calibration.

The models use the tiny configurations of tests/hf_peers.py (transformers' field names and values),
built and initialised by moeinfer directly: importing transformers would cost most of the tests'
time budget, and loading transformers' checkpoints is what the peer tests check.
"""

from __future__ import annotations

from pathlib import Path

import torch

import moeinfer
from moeinfer.compress.calibration import CalibrationData, LayerCalibration

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]


@torch.no_grad()
def build_random(arch: str, seed: int = 0, **overrides):
    """A tiny random fp32 model of `arch` (hf_peers' configuration, with `overrides` of its fields),
    weights ~ N(0, 0.2)."""
    from hf_peers import ARCH_DEFAULTS, BASE

    from moeinfer.arch import parse_config
    from moeinfer.model.transformer import MoEModel

    model = MoEModel(parse_config({**BASE, **ARCH_DEFAULTS[arch], **overrides, "model_type": arch}))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        else:
            p.fill_(1.0)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # a non-zero correction bias takes part in expert choice
            b.copy_(torch.rand(b.shape, generator=g) * 0.1 - 0.05)
    return model.eval().requires_grad_(False)


def random_model(arch: str, root: Path):
    """The tiny random `arch` model, saved once under `root` and loaded from there (as users load)."""
    path = root / arch
    if not path.exists():
        moeinfer.save(build_random(arch), path)
    return moeinfer.load(path, dtype="float32", progress=False)


@torch.no_grad()
def random_calibration(model, tokens: int = 96) -> CalibrationData:
    """The inputs of every MoE block on random token ids (tiny random models have no tokenizer)."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda blk, a: captured.__setitem__(blk.layer_idx, a[0].reshape(-1, a[0].shape[-1])))
             for b in model.moe_blocks()]
    try:
        model(torch.randint(0, model.config.vocab_size, (2, tokens // 2), generator=torch.Generator().manual_seed(5)))
    finally:
        for h in hooks:
            h.remove()
    return CalibrationData("random", tokens, {i: LayerCalibration(i, x) for i, x in captured.items()})


def sample_ids(model, n: int = 12) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(7))


def file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
