"""Writing a model as an HF-format checkpoint that `transformers` loads.

Steps:
1. unstack expert tensors into the checkpoint's per-expert names (views, no copy of the model);
2. split into shards of at most `max_shard_bytes`, write them with the `safetensors` library and
   an index when there is more than one, plus config.json and the tokenizer files;
3. everything goes to a temporary sibling directory that is swapped into place at the end
   (`fsutil.staged_dir`), so a failure or a kill never leaves a half-written checkpoint, and the old
   one is deleted only once the new one is in place.
An existing directory is replaced only when it holds a checkpoint and `overwrite=True`
(`fsutil.check_output_dir`); any other non-empty directory, the current directory and the source
checkpoint's directory (or their parents) are refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from moeinfer.arch import get_arch
from moeinfer.fsutil import check_output_dir, staged_dir
from moeinfer.loading.names import expert_checkpoint_names, to_checkpoint
from moeinfer.model.transformer import MoEModel

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def checkpoint_tensors(model: MoEModel) -> dict[str, torch.Tensor]:
    """Checkpoint name -> tensor (views into the model) in the family's on-disk naming."""
    spec = get_arch(model.config.model_type)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            for hf_name, target in expert_checkpoint_names(name, tensor.shape[0], spec):
                out[hf_name] = target.view(tensor)
        else:
            out[to_checkpoint(name, spec)] = tensor
    return out


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """Does `path` hold a moeinfer / HF checkpoint (config.json plus weights)? Only such a directory
    may be replaced by a save (with overwrite=True)."""
    p = Path(path)
    return (p / "config.json").is_file() and (any((p / f).is_file() for f in WEIGHT_FILES)
                                              or any(p.glob("*.safetensors")))


def check_checkpoint_dest(path: str | os.PathLike[str], *, overwrite: bool = False,
                          source: str | os.PathLike[str] | None = None) -> Path:
    """May a checkpoint be written at `path`? The absolute path, or an OutputDirError saying why not
    (see `fsutil.check_output_dir`); `source` is the checkpoint the model was loaded from."""
    return check_output_dir(path, overwrite=overwrite, holds_output=is_checkpoint_dir, what="checkpoint",
                            protect=[source])


def save_checkpoint(model: MoEModel, path: str | os.PathLike[str], *, overwrite: bool = False,
                    max_shard_bytes: int = 2 * 1024**3, config_updates: dict[str, Any] | None = None) -> Path:
    """Write `model` to directory `path` atomically; returns the path.

    overwrite: replace a directory that already holds a checkpoint (never any other non-empty one)."""
    from safetensors.torch import save_file

    dest = check_checkpoint_dest(path, overwrite=overwrite, source=model.source_dir)
    with staged_dir(dest) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in checkpoint_tensors(model).items()}
        shards = _shards(tensors, max_shard_bytes)
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            fname = ("model.safetensors" if len(shards) == 1
                     else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf = dict(model.config.hf_config)
        hf.setdefault("model_type", model.config.model_type)
        hf.setdefault("architectures", [get_arch(model.config.model_type).hf_class])
        hf["dtype"] = _DTYPE_NAMES.get(model.dtype, "float32")
        hf.pop("torch_dtype", None)
        hf.update(config_updates or {})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
        if model.source_dir and (Path(model.source_dir) / "generation_config.json").is_file():
            shutil.copy(Path(model.source_dir) / "generation_config.json", tmp / "generation_config.json")
    return dest
