"""Shared helpers of the quantization / low-rank tests: tiny random models and their calibration."""

from __future__ import annotations

from pathlib import Path

import torch

import moeinfer
from moeinfer.compress.calibration import CalibrationData, LayerCalibration

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]


def random_model(arch: str, root: Path):
    """A tiny random checkpoint of `arch` (transformers' config classes), loaded in fp32."""
    from hf_peers import save_hf_checkpoint

    path = root / arch
    if not path.exists():
        save_hf_checkpoint(arch, path)
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
