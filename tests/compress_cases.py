"""Tiny random checkpoints of every supported architecture, with calibration, for compression tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

import moeinfer
from hf_peers import save_hf_checkpoint
from moeinfer.compress.calibration import CalibrationConfig, CalibrationData, collect
from tiny_tokenizer import write_tokenizer

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
IDS = torch.tensor([[5, 17, 250, 3, 99, 42, 7, 120, 64, 8]])
CALIB = CalibrationConfig(source="english", max_tokens=192, seq_len=64)

_CACHE: dict[str, tuple[Path, moeinfer.MoEModel, CalibrationData]] = {}


def tiny(arch: str, root: Path) -> tuple[Path, moeinfer.MoEModel, CalibrationData]:
    """(checkpoint dir, a fresh copy of the loaded model, its calibration data); built once per arch."""
    if arch not in _CACHE:
        path = root / arch
        path.mkdir(parents=True, exist_ok=True)
        save_hf_checkpoint(arch, path, vocab_size=300)
        write_tokenizer(path)
        model = moeinfer.load(path, progress=False)
        _CACHE[arch] = (path, model, collect(model, CALIB, progress=False))
    path, model, calib = _CACHE[arch]
    return path, copy.deepcopy(model), calib


def logits(model: moeinfer.MoEModel) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def hf_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=IDS).logits


def num_experts(model: moeinfer.MoEModel) -> list[int]:
    return [b.experts.num_experts for b in model.moe_blocks()]
