"""`moeinfer.load`, `moeinfer.save` and `moeinfer.export`: the entry points from and to HF-format checkpoint
dirs (and GGUF files: `load` reads them, `export` writes them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moeinfer.loading.checkpoint import check_finite, load_checkpoint
from moeinfer.loading.filetype import is_gguf
from moeinfer.loading.gguf import export_gguf, load_gguf
from moeinfer.loading.save import save_checkpoint
from moeinfer.model.transformer import MoEModel
from moeinfer.models import resolve_model_path
from moeinfer.offload.apply import offload_
from moeinfer.parallel.apply import load_expert_parallel

if TYPE_CHECKING:
    from moeinfer.offload.config import OffloadConfig
    from moeinfer.parallel.config import ExpertParallelConfig


def load(path: str | os.PathLike[str], *, device: torch.device | str = "cpu",
         dtype: torch.dtype | str | None = None, progress: bool = True,
         expert_parallel: ExpertParallelConfig | None = None, on_expert_error: str = "raise",
         check_weights: bool = False, offload: OffloadConfig | None = None,
         check_memory: bool = True) -> MoEModel:
    """Load a local HF-format MoE checkpoint (or a shipped model by name, or a GGUF file) as an eval-mode
    MoEModel.

    expert_parallel: under torchrun, read only this rank's experts and spread them over the ranks
    (`moeinfer.parallel.apply_expert_parallel_`).
    on_expert_error: "mask" loads a checkpoint whose routed experts are missing, mis-shaped or not
    finite with those experts masked in their routers (`model.failed_experts` says which and why).
    check_weights: refuse weights holding NaN or Inf (a CheckpointError names them; one pass over the weights).
    offload: load with the experts offloaded (`offload_`). With tier "disk" the experts are never read
    into memory: the checkpoint's own files are the disk tier (read per expert; `offload_dir` is not
    used), so a checkpoint bigger than memory loads with only its dense weights and the cache resident.

    check_memory: a checkpoint whose weights exceed the free memory is refused with a CheckpointError
    before anything is allocated (offload it, or plan it: `moeinfer.load_planned`); False skips the check
    (e.g. with swap)."""
    if is_gguf(resolve_model_path(path)):  # llama.cpp's format: moeinfer.loading.gguf
        if expert_parallel is not None:
            raise ValueError(f"{path}: expert parallelism loads HF-format checkpoint directories, not GGUF files")
        model = load_gguf(resolve_model_path(path), device=device, dtype=dtype, progress=progress)
        if check_weights:
            check_finite(model, path)
        return model if offload is None else offload_(model, offload, progress=progress)
    if offload is not None:
        if expert_parallel is not None or on_expert_error != "raise":
            raise ValueError("load(offload=...) cannot be combined with expert_parallel or on_expert_error='mask'")
        model = load_checkpoint(resolve_model_path(path), device=device, dtype=dtype, progress=progress,
                                check_weights=check_weights, experts_on_disk=offload.tier == "disk",
                                check_memory=check_memory)
        return offload_(model, offload, progress=progress)
    if expert_parallel is not None:
        model = load_expert_parallel(resolve_model_path(path), config=expert_parallel, device=device, dtype=dtype,
                                     progress=progress)
        if check_weights:
            check_finite(model, path)  # this rank's experts and the shared weights
        return model

    return load_checkpoint(resolve_model_path(path), device=device, dtype=dtype, progress=progress,
                           on_expert_error=on_expert_error, check_weights=check_weights, check_memory=check_memory)


def export(model: MoEModel, path: str | os.PathLike[str], *, format: str = "gguf", quant: str = "auto",
           overwrite: bool = False, progress: bool = True) -> Any:
    """Write `model` in another system's format: "gguf" (llama.cpp, Ollama; `quant` in auto, bf16, f16, f32,
    q8_0, q4_0; see moeinfer.loading.gguf.export). Returns the export report (types written, notes)."""
    if format != "gguf":
        raise ValueError(f"export format {format!r} is not supported; supported: gguf")
    return export_gguf(model, path, quant=quant, overwrite=overwrite, progress=progress)


def save(model: MoEModel, path: str | os.PathLike[str], *, overwrite: bool = False,
         max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write `model` as an HF-format checkpoint directory (atomically: temp dir beside, then swapped in).

    A missing or empty `path` is written; one that holds a checkpoint is replaced only with `overwrite=True`;
    any other non-empty directory, the current directory and the model's source checkpoint (or a parent
    of either) are refused with `moeinfer.fsutil.OutputDirError` (overwrite=True allows the last two)."""
    return save_checkpoint(model, path, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
