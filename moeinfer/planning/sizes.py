"""A model's sizes for planning, from config.json and safetensors headers only (no weights read), so a
checkpoint bigger than memory is planned without loading it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from moeinfer.planning.costs import ModelSizes
from moeinfer.planning.shape_costs import shape_key
from moeinfer.arch import parse_config
from moeinfer.loading.checkpoint import parse_dtype, read_config, shard_files
from moeinfer.loading.expert_files import memory_available
from moeinfer.loading.safetensors_io import SafetensorsFile
from moeinfer.model.transformer import MoEModel
from moeinfer.models import resolve_model_path
from moeinfer.offload.hardware import ModelShape


def _sizes_of(model: Any, name: str, dtype: torch.dtype) -> ModelSizes:
    c = model.config
    shape = ModelShape.from_model(model, name=name)
    head = model.lm_head.weight.numel()
    dtype_bytes = dtype.itemsize
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * dtype_bytes
    return ModelSizes(name=name, num_layers=shape.num_layers, num_experts=shape.num_experts, top_k=shape.top_k,
                      hidden=shape.hidden, inter=shape.inter, dtype_bytes=dtype_bytes,
                      dense_params_per_layer=shape.dense_params_per_layer, other_params=shape.other_params,
                      head_params=head, kv_bytes_per_token=kv_per_token, vocab=c.vocab_size,
                      max_context=c.max_position_embeddings, dtype=str(dtype).removeprefix("torch."),
                      shape_key=shape_key(c, str(dtype).removeprefix("torch.")))


def sizes_from_model(model: Any, name: str | None = None) -> ModelSizes:
    """Sizes of a loaded model (its parameters' dtype)."""
    src = getattr(model, "source_dir", None)
    return _sizes_of(model, name or (Path(src).name if src else "model"), model.dtype)


def config_of(model_or_path: Any) -> Any:
    """The ModelConfig of a loaded model, checkpoint folder or shipped model (config.json alone)."""
    if isinstance(model_or_path, MoEModel):
        return model_or_path.config
    return parse_config(read_config(resolve_model_path(model_or_path)))


def sizes_from_checkpoint(path: str | os.PathLike[str]) -> ModelSizes:
    """Sizes of a checkpoint folder or shipped model: a meta-device model built from config.json."""
    root = resolve_model_path(path)
    hf = read_config(root)
    with torch.device("meta"):
        model = MoEModel(parse_config(hf))
    dtype = parse_dtype(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16")
    return _sizes_of(model, root.name, dtype if dtype is not None else torch.bfloat16)


def checkpoint_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the checkpoint's tensors, from the safetensors headers."""
    files, _ = shard_files(resolve_model_path(path))
    return sum(e.nbytes for f in files for e in SafetensorsFile(f).entries.values())


def available_memory(device: str) -> int:
    """Bytes free now: MemAvailable on the CPU, free GPU memory on CUDA."""
    return memory_available(device)
