"""`moeinfer init`: a random-weight checkpoint with a real model's shapes, written without a hub.

The checkpoint is an ordinary HF-format directory (config.json, safetensors shards + index, the
shipped model's tokenizer) that `moeinfer.load` and `transformers` both read. Weights follow HF's
own initialisation (`_init_weights`): matrices and embeddings ~ normal(0, initializer_range), norm
weights 1, biases and DeepSeek-V3's expert-score correction bias 0 — small enough that activations
stay finite through any depth, so the model generates (nonsense) without NaN.

Steps (`init_checkpoint`):
1. config.json from a shape preset and overrides (moeinfer.loading.shapes), checked by the loader's
   own parser;
2. the tensor list (checkpoint names and shapes) from the eager model built on the meta device, in
   the family's on-disk naming (moeinfer.loading.names), so it is exactly what the loader expects;
3. shards planned from the sizes alone, then each shard's safetensors header written first and
   every tensor generated and written a chunk of rows at a time (a seeded generator per tensor):
   the model is never in memory, the peak is one chunk;
4. everything goes to a temporary sibling directory renamed into place at the end; an existing
   non-empty destination is refused (`check_destination`).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeinfer.arch import get_arch, parse_config
from moeinfer.fsutil import publishable_
from moeinfer.loading.checkpoint import parse_dtype
from moeinfer.loading.names import expert_checkpoint_names, to_checkpoint
from moeinfer.loading.shapes import resolve_shape
from moeinfer.model.transformer import MoEModel
from moeinfer.models import shipped_model_dir

CHUNK_BYTES = 8 * 1024**2  # fp32 bytes generated at a time
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: name, shape and how it is initialised ("normal", "ones", "zeros")."""

    name: str
    shape: tuple[int, ...]
    init: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def check_destination(path: Path) -> None:
    """Refuse to write over anything a user owns: `path` must not exist or be an empty directory."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory; choose a new --out or remove it")


def _init_kind(name: str) -> str:
    if name.endswith("norm.weight"):  # input/post-attention/final norms, q/k norms, MLA's latent norms
        return "ones"
    if name.endswith((".bias", "e_score_correction_bias")):
        return "zeros"
    return "normal"


def tensor_specs(hf: dict[str, Any]) -> list[TensorSpec]:
    """Step 2: every tensor the loader expects for config `hf`, in model order."""
    config = parse_config(hf)
    spec = get_arch(config.model_type)
    with torch.device("meta"):  # no storage at all (meta_parameters would allocate each one first)
        model = MoEModel(config)
    out: list[TensorSpec] = []
    for name, t in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            for ck, target in expert_checkpoint_names(name, t.shape[0], spec):
                out.append(TensorSpec(ck, tuple(target.view(t).shape), "normal"))
        else:
            ck = to_checkpoint(name, spec)
            out.append(TensorSpec(ck, tuple(t.shape), _init_kind(ck)))
    return out


def _plan_shards(specs: list[TensorSpec], itemsize: int, max_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        n = s.numel * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    return shards


def _chunks(spec: TensorSpec, dtype: torch.dtype, seed: int, std: float) -> Iterator[torch.Tensor]:
    """The tensor's values, a block of rows at a time (flattened), in `dtype`."""
    n = spec.numel
    if spec.init != "normal":
        fill = 1.0 if spec.init == "ones" else 0.0
        step = CHUNK_BYTES // 4
        for start in range(0, n, step):
            yield torch.full((min(step, n - start),), fill, dtype=dtype)
        return
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{spec.name}".encode()))  # CPU seeds are 32-bit
    row = spec.shape[-1] if spec.shape else 1
    rows_per = max(1, CHUNK_BYTES // (4 * row))
    for start in range(0, n // row, rows_per):
        m = min(rows_per, n // row - start)
        yield torch.randn(m * row, generator=gen).mul_(std).to(dtype)


def _write_shard(path: Path, specs: list[TensorSpec], dtype: torch.dtype, seed: int, std: float, bar: Any) -> None:
    """Step 3 for one file: header from the shapes, then the tensors streamed in order."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": _ST_DTYPES[dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.numel * itemsize]}
        offset += s.numel * itemsize
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for s in specs:
            for chunk in _chunks(s, dtype, seed, std):
                f.write(memoryview(chunk.view(torch.uint8).numpy()))
                bar.update(chunk.numel() * itemsize)
        f.flush()
        os.fsync(f.fileno())


def _tokenizer_dir() -> Path:
    src = shipped_model_dir("tiny")
    if src is None:
        raise FileNotFoundError("the shipped model's tokenizer (moeinfer/models/moeinfer-tiny) is missing")
    return src


def _check_vocab(hf: dict[str, Any]) -> None:
    """The shipped tokenizer's ids must all have an embedding row."""
    from tokenizers import Tokenizer as Backend

    n = Backend.from_file(str(_tokenizer_dir() / "tokenizer.json")).get_vocab_size()
    if int(hf["vocab_size"]) < n:
        raise ValueError(f"--shape vocab_size={hf['vocab_size']} is smaller than the tokenizer written with the "
                         f"checkpoint ({n} tokens); use vocab_size >= {n}")


@torch.no_grad()
def init_checkpoint(out: str | os.PathLike[str], *, arch: str | None = None, shape: str | None = None,
                    layers: int | None = None, dtype: torch.dtype | str = "bfloat16", seed: int = 0,
                    max_shard_bytes: int = 2 * 1024**3, progress: bool = True) -> Path:
    """Write a random-weight checkpoint of `arch` with `shape` (a preset, `key=val,...`, or both) to `out`;
    see the module docstring. Returns the checkpoint's path."""
    from tqdm.auto import tqdm

    torch_dtype = parse_dtype(dtype)
    if torch_dtype not in _ST_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; supported: float32, bfloat16, float16")
    dest = Path(out).resolve()
    check_destination(dest)
    # 1.-2. config and tensor list
    hf = resolve_shape(shape, arch=arch, layers=layers)
    hf["dtype"] = _DTYPE_NAMES[torch_dtype]
    _check_vocab(hf)
    specs = tensor_specs(hf)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards = _plan_shards(specs, itemsize, max_shard_bytes)
    total = sum(s.numel for s in specs) * itemsize
    std = float(hf.get("initializer_range", 0.02))
    # 3. stream into a temporary sibling
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        names = (["model.safetensors"] if len(shards) == 1
                 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"init {dest.name}", disable=not progress or None) as bar:
            for fname, shard in zip(names, shards):
                _write_shard(tmp / fname, shard, torch_dtype, seed, std, bar)
        if len(shards) > 1:
            weight_map = {s.name: fname for fname, shard in zip(names, shards) for s in shard}
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(_tokenizer_dir() / name, tmp / name)
        publishable_(tmp)
        # 4. publish (an empty destination directory is replaced by the rename)
        check_destination(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
