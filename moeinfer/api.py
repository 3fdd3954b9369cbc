"""`moeinfer.load` and `moeinfer.save`: the entry points from and to HF-format checkpoint dirs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moeinfer.loading.checkpoint import load_checkpoint
from moeinfer.loading.save import save_checkpoint
from moeinfer.model.transformer import MoEModel
from moeinfer.models import resolve_model_path
from moeinfer.parallel.apply import load_expert_parallel

if TYPE_CHECKING:
    from moeinfer.parallel.config import ExpertParallelConfig


def load(path: str | os.PathLike[str], *, device: torch.device | str = "cpu",
         dtype: torch.dtype | str | None = None, progress: bool = True,
         expert_parallel: ExpertParallelConfig | None = None, on_expert_error: str = "raise") -> MoEModel:
    """Load a local HF-format MoE checkpoint (or a shipped model by name) as an eval-mode MoEModel.

    expert_parallel: under torchrun, read only this rank's experts and spread them over the ranks
    (`moeinfer.parallel.apply_expert_parallel_`).
    on_expert_error: "mask" loads a checkpoint whose routed experts are missing, mis-shaped or not
    finite with those experts masked in their routers (`model.failed_experts` says which and why)."""
    if expert_parallel is not None:
        return load_expert_parallel(resolve_model_path(path), config=expert_parallel, device=device, dtype=dtype,
                                    progress=progress)

    return load_checkpoint(resolve_model_path(path), device=device, dtype=dtype, progress=progress,
                           on_expert_error=on_expert_error)


def save(model: MoEModel, path: str | os.PathLike[str], *, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write `model` as an HF-format checkpoint directory (atomically: temp dir, then rename)."""
    return save_checkpoint(model, path, max_shard_bytes=max_shard_bytes)
