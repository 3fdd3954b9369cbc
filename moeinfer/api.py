"""`moeinfer.load`, `moeinfer.save` and `moeinfer.export`: the entry points from and to HF-format checkpoint
dirs (and GGUF files: `load` reads them, `export` writes them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moeinfer.model.transformer import MoEModel

if TYPE_CHECKING:
    from moeinfer.parallel.config import ExpertParallelConfig


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """A directory, or the name of a model shipped with moeinfer."""
    p = Path(path)
    if p.exists():
        return p
    from moeinfer.models import shipped_model_dir

    shipped = shipped_model_dir(str(path))
    return shipped if shipped is not None else p


def load(path: str | os.PathLike[str], *, device: torch.device | str = "cpu",
         dtype: torch.dtype | str | None = None, progress: bool = True,
         expert_parallel: ExpertParallelConfig | None = None, on_expert_error: str = "raise") -> MoEModel:
    """Load a local HF-format MoE checkpoint (or a shipped model by name, or a GGUF file) as an eval-mode
    MoEModel.

    expert_parallel: under torchrun, read only this rank's experts and spread them over the ranks
    (`moeinfer.parallel.apply_expert_parallel_`).
    on_expert_error: "mask" loads a checkpoint whose routed experts are missing, mis-shaped or not
    finite with those experts masked in their routers (`model.failed_experts` says which and why)."""
    from moeinfer.loading.checkpoint import load_checkpoint

    if resolve_model_path(path).is_file():  # a GGUF file (llama.cpp's format): moeinfer.interop.gguf
        from moeinfer.interop.gguf import load_gguf

        if expert_parallel is not None:
            raise ValueError(f"{path}: expert parallelism loads HF-format checkpoint directories, not GGUF files")
        return load_gguf(resolve_model_path(path), device=device, dtype=dtype, progress=progress)
    if expert_parallel is not None:
        from moeinfer.parallel.apply import load_expert_parallel

        return load_expert_parallel(resolve_model_path(path), config=expert_parallel, device=device, dtype=dtype,
                                    progress=progress)

    return load_checkpoint(resolve_model_path(path), device=device, dtype=dtype, progress=progress,
                           on_expert_error=on_expert_error)


def export(model: MoEModel, path: str | os.PathLike[str], *, format: str = "gguf", quant: str = "auto",
           overwrite: bool = False, progress: bool = True) -> Any:
    """Write `model` in another system's format: "gguf" (llama.cpp, Ollama; `quant` in auto, bf16, f16, f32,
    q8_0, q4_0; see moeinfer.interop.gguf.export). Returns the export report (types written, notes)."""
    if format != "gguf":
        raise ValueError(f"export format {format!r} is not supported; supported: gguf")
    from moeinfer.interop.gguf import export_gguf

    return export_gguf(model, path, quant=quant, overwrite=overwrite, progress=progress)


def save(model: MoEModel, path: str | os.PathLike[str], *, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write `model` as an HF-format checkpoint directory (atomically: temp dir, then rename)."""
    from moeinfer.loading.save import save_checkpoint

    return save_checkpoint(model, path, max_shard_bytes=max_shard_bytes)
