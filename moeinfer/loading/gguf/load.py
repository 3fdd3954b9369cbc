"""Loading a GGUF file (llama.cpp's format) as a moeinfer model.

Shapes: E experts, D hidden, I expert inner size.

Steps:
1. open the file with gguf's reader (memory-mapped), find the family from `general.architecture`
   and rebuild config.json's fields from the metadata (archmap), parsed by moeinfer.arch as usual;
2. build the model on the meta device; a layer whose three expert tensors are all Q8_0 or all Q4_0
   gets QuantizedExperts (8 or 4 bits, group 32) so its blocks stay packed (no dequantize-requantize);
3. allocate the parameters (the checkpoint loader's `_materialize`: same dtypes as a safetensors load);
4. fill them: Q8_0/Q4_0 expert blocks moved into moeinfer's storage bit for bit (blocks); F32/F16/BF16
   tensors copied as they are; any other ggml type (K-quants, ...) dequantized by the gguf package's
   reference dequantizers and cast to the model dtype (bf16 unless asked otherwise); llama's q/k rows
   put back into HF's rotate-half order; MLA's attn_k_b/attn_v_b merged back into kv_b_proj (deepseek);
   a sigmoid router's correction bias (exp_probs_b) is zero when the file has none;
5. rebuild the tokenizer from the GGUF tokenizer keys (vocab).
Every problem with the file is a GGUFError naming the file and the key, tensor or type.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeinfer.arch import parse_config
from moeinfer.config import ConfigError
from moeinfer.loading.gguf.archmap import Metadata, family_for_import, hf_config
from moeinfer.loading.gguf.blocks import from_ggml
from moeinfer.loading.gguf.deepseek import merge_kv_b
from moeinfer.loading.gguf.errors import GGUFError
from moeinfer.loading.gguf.vocab import read_tokenizer
from moeinfer.model.transformer import MoEModel
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.loading.checkpoint import _materialize, meta_parameters, parse_dtype
from moeinfer.loading.gguf.names import EXPERT_PARTS, expert_tensor, from_gguf, qk_heads, to_gguf, unpermute_qk

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
_PACKED_BITS = {"Q8_0": 8, "Q4_0": 4}
_FLOAT_NP = {"F32": np.float32, "F16": np.float16}
_DEFAULT_DTYPE = {"F32": torch.float32, "F16": torch.float16}


def _open(path: Path) -> Any:
    from gguf import GGUFReader

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r}, not {MAGIC!r})")
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors on a bad file
        raise GGUFError(f"{path} is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from e


def _type_name(t: Any) -> str:
    return t.tensor_type.name


def _float_tensor(t: Any, path: Path) -> torch.Tensor:
    """A float ggml tensor (or any type the gguf package dequantizes) as a torch tensor, numpy-order shape."""
    kind = _type_name(t)
    if kind in _FLOAT_NP:
        return torch.from_numpy(np.array(t.data, dtype=_FLOAT_NP[kind]))
    if kind == "BF16":
        raw = torch.from_numpy(np.array(t.data, dtype=np.uint8))
        return raw.view(torch.bfloat16)
    from gguf.quants import dequantize

    try:
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
    except NotImplementedError as e:
        raise GGUFError(f"{path}: tensor {t.name!r} has ggml type {kind}, which the gguf package cannot "
                        "dequantize") from e


def _shape(t: torch.Tensor, want: tuple[int, ...], name: str, path: Path) -> torch.Tensor:
    if tuple(t.shape) != tuple(want):
        if t.numel() == int(np.prod(want)) and t.dim() == 1 and len(want) == 2 and want[0] == 1:
            return t.reshape(want)  # qwen2moe's shared-expert gate, [D] in GGUF, [1, D] here
        raise GGUFError(f"{path}: tensor {name!r} has shape {list(t.shape)}, expected {list(want)} from the metadata")
    return t


def _expert_kinds(model: MoEModel, tensors: dict[str, Any], path: Path) -> dict[int, int | None]:
    """Step 2: per MoE layer, the packed width its experts keep (8, 4) or None (float)."""
    out: dict[int, int | None] = {}
    for block in model.moe_blocks():
        names = [expert_tensor(block.layer_idx, p) for p in EXPERT_PARTS]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise GGUFError(f"{path}: expert tensor(s) {', '.join(missing)} are missing")
        kinds = {_type_name(tensors[n]) for n in names}
        bits = _PACKED_BITS.get(next(iter(kinds))) if len(kinds) == 1 else None
        if bits is None and kinds & set(_PACKED_BITS):
            log.info("%s: layer %d mixes expert types; dequantized", path.name, block.layer_idx)
        out[block.layer_idx] = bits
    return out


def _read_config(p: Path) -> tuple[Any, Metadata, Any, dict[str, Any]]:
    """Step 1: (reader, metadata, family, config.json fields) of a GGUF file."""
    if not p.is_file():
        raise GGUFError(f"GGUF file {p} does not exist")
    reader = _open(p)
    meta = Metadata(reader.fields, str(p))
    family = family_for_import(str(meta.require("general.architecture")), str(p))
    names = {t.name: t for t in reader.tensors}
    hf = hf_config(meta, family, has_output="output.weight" in names, has_qkv_bias="blk.0.attn_q.bias" in names,
                   has_o_bias="blk.0.attn_output.bias" in names)
    embd = names.get("token_embd.weight")
    hf["dtype"] = str(_DEFAULT_DTYPE.get(_type_name(embd), torch.bfloat16) if embd is not None
                      else torch.bfloat16).removeprefix("torch.")
    return reader, meta, family, hf


def gguf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A GGUF file's model description as config.json fields (what `read_config` gives for a checkpoint
    directory), read from its metadata; no tensor data is read."""
    return _read_config(Path(path))[3]


def load_gguf(path: str | os.PathLike[str], *, device: torch.device | str = "cpu",
              dtype: torch.dtype | str | None = None, progress: bool = True) -> MoEModel:
    """Load a GGUF file as an eval-mode MoEModel; see the module docstring for the steps."""
    from tqdm.auto import tqdm

    p = Path(path)
    # 1. metadata -> config
    reader, meta, family, hf = _read_config(p)
    tensors = {t.name: t for t in reader.tensors}
    try:
        config = parse_config(hf)
    except ConfigError as e:
        raise GGUFError(f"{p}: the metadata gives a config moeinfer cannot run: {e}") from e
    # 2. the model on meta, packed experts where the file has them
    with meta_parameters():
        model = MoEModel(config)
    packed = _expert_kinds(model, tensors, p)
    D, I = config.hidden_size, config.moe_intermediate_size
    for block in model.moe_blocks():
        bits = packed[block.layer_idx]
        if bits is not None:
            with meta_parameters():
                block.experts = QuantizedExperts([bits] * config.num_experts, D, I, 32)
    # 3. storage
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{p}: tensor 'token_embd.weight' is missing")
    target = parse_dtype(dtype) or _DEFAULT_DTYPE.get(_type_name(tensors["token_embd.weight"]), torch.bfloat16)
    _materialize(model, target, torch.device(device))
    params = dict(model.named_parameters())
    biases = {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    params.update(biases)
    # 4. fill
    used: set[str] = set()
    total = sum(int(t.n_bytes) for t in reader.tensors)
    with torch.no_grad(), tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {p.name}",
                               disable=not progress or None) as bar:
        for gname, t in tensors.items():
            name = from_gguf(gname)
            if name is None or name not in params:
                continue
            value = _shape(_float_tensor(t, p), tuple(params[name].shape), gname, p)
            heads = qk_heads(name, config.num_heads, config.num_kv_heads) if family.permute_qk else None
            params[name].copy_(unpermute_qk(value, heads) if heads else value)
            used.add(gname)
            bar.update(int(t.n_bytes))
        if config.mla is not None:
            before = set(used)
            _fill_kv_b(model, tensors, p, used)
            bar.update(sum(int(tensors[n].n_bytes) for n in used - before if n in tensors))
        for block in model.moe_blocks():
            _fill_experts(block, packed[block.layer_idx], tensors, p, used)
            bar.update(sum(int(tensors[expert_tensor(block.layer_idx, q)].n_bytes) for q in EXPERT_PARTS))
    for name, bias in biases.items():
        if to_gguf(name) not in used:  # a sigmoid router without a selection bias
            bias.zero_()
            used.add(str(to_gguf(name)))
    expected = {n for n in (_gguf_name(k) for k in params) if n is not None}
    missing = sorted(expected - used)
    if missing:
        raise GGUFError(f"{p}: tensor(s) {', '.join(missing[:6])} are missing" + (f" (and {len(missing) - 6} more)"
                                                                                 if len(missing) > 6 else ""))
    extra = sorted(set(tensors) - used)
    if extra:
        log.warning("%s: ignoring %d tensor(s) the model does not use: %s", p.name, len(extra), ", ".join(extra[:8]))
    model.eval()
    model.requires_grad_(False)
    model.source_dir = str(p)
    # 5. tokenizer
    model.tokenizer = read_tokenizer(meta)
    return model


def _gguf_name(name: str) -> str | None:
    return None if ".mlp.experts." in name else to_gguf(name)


def _fill_kv_b(model: MoEModel, tensors: dict[str, Any], path: Path, used: set[str]) -> None:
    """Step 4 for MLA: kv_b_proj from llama.cpp's attn_k_b [H, C, Dn] + attn_v_b [H, Dv, C] (deepseek.merge_kv_b);
    files holding attn_kv_b whole were read with the other tensors."""
    mla, H = model.config.mla, model.config.num_heads
    assert mla is not None
    C, Dn, Dv = mla.kv_lora_rank, mla.qk_nope_head_dim, mla.v_head_dim
    for i, layer in enumerate(model.layers):
        k_name, v_name = f"blk.{i}.attn_k_b.weight", f"blk.{i}.attn_v_b.weight"
        if k_name not in tensors and v_name not in tensors:
            continue
        for name in (k_name, v_name):
            if name not in tensors:
                raise GGUFError(f"{path}: tensor {name!r} is missing (attn_k_b and attn_v_b come in pairs)")
        k_b = _shape(_float_tensor(tensors[k_name], path), (H, C, Dn), k_name, path)
        v_b = _shape(_float_tensor(tensors[v_name], path), (H, Dv, C), v_name, path)
        with torch.no_grad():
            layer.self_attn.kv_b_proj.weight.copy_(merge_kv_b(k_b, v_b))
        used.update((k_name, v_name, f"blk.{i}.attn_kv_b.weight"))


def _fill_experts(block: Any, bits: int | None, tensors: dict[str, Any], path: Path, used: set[str]) -> None:
    """Step 4 for one layer's experts: packed blocks moved bit for bit, anything else as floats."""
    ex, layer = block.experts, block.layer_idx
    names = {q: expert_tensor(layer, q) for q in EXPERT_PARTS}
    if bits is not None:
        D, I = ex.hidden_size, ex.intermediate_size
        E = ex.num_experts
        parts = {}
        for q, cols, rows in (("gate", D, I), ("up", D, I), ("down", I, D)):
            raw = torch.from_numpy(np.array(tensors[names[q]].data, dtype=np.uint8))
            want = (E, rows, cols // 32 * (34 if bits == 8 else 18))
            _shape(raw, want, names[q], path)
            parts[q] = from_ggml(raw, bits=bits, cols=cols)
        for i, m in enumerate(("q", "s", "z")):
            getattr(ex, f"{m}{bits}_gate_up").copy_(torch.cat([parts["gate"][i], parts["up"][i]], dim=1))
            getattr(ex, f"{m}{bits}_down").copy_(parts["down"][i])
    else:
        I = ex.down_proj.shape[2]
        def read(part: str, like: torch.Tensor) -> torch.Tensor:
            return _shape(_float_tensor(tensors[names[part]], path), tuple(like.shape), names[part], path)

        gate, up = read("gate", ex.gate_up_proj[:, :I]), read("up", ex.gate_up_proj[:, I:])
        down = read("down", ex.down_proj)
        ex.gate_up_proj[:, :I].copy_(gate)
        ex.gate_up_proj[:, I:].copy_(up)
        ex.down_proj.copy_(down)
    used.update(names.values())
