"""Loading a local Hugging Face checkpoint directory into the eager MoE model.

Steps:
1. read config.json (types and ranges of its fields checked, see `config_json`) and pick the
   architecture adapter by `model_type`; read every shard's header (offsets checked against the file);
2. build the model entirely on the meta device and check every expected tensor's presence, shape and
   dtype kind against the headers, so a config that disagrees with the files is named before anything
   is allocated;
3. build it again with parameters on meta and buffers real, and allocate each parameter once, in the
   requested dtype and device;
4. read every tensor of every shard (in file order) straight into its parameter or expert slice;
5. optionally (`check_weights`) scan the weights for NaN/Inf, then attach the tokenizer.
Before step 3 the bytes to allocate are compared with the memory free on the device: a checkpoint
that does not fit is refused with a clear error instead of being killed for memory half-way. With
`experts_on_disk`, the routed experts are not allocated nor read: their parameters stay on the meta
device and `model.expert_files` records where each expert lies in the files
(moeinfer.loading.expert_files), for `offload_` to use the checkpoint itself as its disk tier.
Only safetensors are read; pickle files are never opened. With `expert_slots` (expert parallelism),
each MoE layer is built with only the listed experts and the other experts' tensors are never read.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeinfer.arch import get_arch, parse_config
from moeinfer.config import ConfigError
from moeinfer.loading.config_json import EXPERT_COUNTS, check_config_fields, check_weight_map, read_json
from moeinfer.loading.devices import parse_device
from moeinfer.formats.layout import RECORD_VERSION, is_plain, restore_
from moeinfer.loading.errors import CheckpointError
from moeinfer.loading.expert_files import ExpertFiles, ExpertPart, memory_available
from moeinfer.loading.filetype import is_gguf
from moeinfer.loading.names import Target, expert_checkpoint_names, to_checkpoint, to_internal
from moeinfer.loading.safetensors_io import STAGING_BYTES, SafetensorsFile
from moeinfer.loading.tokenizer import Tokenizer
from moeinfer.model.gating import set_routing_
from moeinfer.model.meta import meta_parameters
from moeinfer.model.moe import Experts
from moeinfer.model.transformer import MoEModel

log = logging.getLogger(__name__)

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} is not supported; supported: {', '.join(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[dtype]


def read_config(path: Path) -> dict[str, Any]:
    """config.json of checkpoint directory `path`, with the fields moeinfer reads type- and range-checked;
    for a GGUF file, the same fields from its metadata (moeinfer.loading.gguf)."""
    path = Path(path)
    if is_gguf(path):
        # Imported here: moeinfer.loading.gguf builds on this module (a cycle at module level).
        from moeinfer.loading.gguf import gguf_config

        return gguf_config(path)
    cfg_path = path / "config.json"
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory (give the directory that holds "
                              "config.json and the *.safetensors files)")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing: a checkpoint directory needs a config.json")
    hf = read_json(cfg_path)
    check_config_fields(hf, cfg_path)
    return hf


def model_config(hf: dict[str, Any], where: Path) -> Any:
    """parse_config with the file named in every error (a value an adapter cannot use, a bad combination)."""
    try:
        return parse_config(hf)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if str(where) not in str(e) else str(e)) from None
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
        raise ConfigError(f"{where}: a field has a value moeinfer cannot use ({type(e).__name__}: {e})") from None


def shard_files(path: Path) -> tuple[list[Path], dict[str, str]]:
    """Shard paths and the index's tensor -> file map (empty for a single file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = check_weight_map(read_json(index), index)
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"shard file(s) {', '.join(missing)} listed in {index} are missing from {path}")
        return [path / f for f in files], weight_map
    single = path / "model.safetensors"
    if single.is_file():
        return [single], {}
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded)" if pickles else ""
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}{hint}")


def _allocation_bytes(model: MoEModel, dtype: torch.dtype, skip: frozenset[int]) -> int:
    """Bytes `_materialize` will allocate (parameters once each, floating ones in `dtype`)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        keep = getattr(module, "keep_float_dtype", False)
        for param in module._parameters.values():
            if param is None or id(param) in skip or id(param) in seen:
                continue
            seen.add(id(param))
            own = not param.is_floating_point() or keep
            total += param.numel() * (param.element_size() if own else itemsize)
    return total


def check_fits(need: int, device: torch.device, root: Path) -> None:
    """Refuse to allocate `need` bytes of weights when the device has less free (a clear error, before
    anything is allocated, instead of the process being killed for memory)."""
    free = memory_available(device)
    if need > free:
        raise CheckpointError(
            f"checkpoint {root} needs {need / 1e9:.1f} GB of memory for its weights, but only {free / 1e9:.1f} GB "
            f"is available on {device}: load it with its experts offloaded (`moeinfer plan --model {root} "
            f"--memory ...` then `--plan plan.yaml`, or `--plan auto`; in Python moeinfer.load_planned(path, plan) "
            "or moeinfer.load(path, offload=OffloadConfig(...))), or free memory")


def _materialize(model: MoEModel, dtype: torch.dtype, device: torch.device,
                 skip: frozenset[int] = frozenset()) -> None:
    """Give every meta parameter real (uninitialised) storage, once; keeps weight tying. Parameters
    whose id is in `skip` stay on meta (experts left on disk)."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        # packed integer tensors and quantization scales (`keep_float_dtype` modules) keep their dtype
        keep = getattr(module, "keep_float_dtype", False)
        for name, param in list(module._parameters.items()):
            if param is None or id(param) in skip:
                continue
            if id(param) not in seen:
                own = not param.is_floating_point() or keep
                seen[id(param)] = nn.Parameter(torch.empty(param.shape, device=device,
                                                           dtype=param.dtype if own else dtype),
                                               requires_grad=False)
            module._parameters[name] = seen[id(param)]
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_floating_point():
                keep_fp32 = name == "e_score_correction_bias" or name == "inv_freq"
                module._buffers[name] = buf.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
            elif buf is not None:  # integer buffers keep their dtype (buffers are never on meta here)
                module._buffers[name] = buf.to(device)


def _expert_layer(name: str) -> int:
    return int(name.split(".")[1])  # layers.{i}.mlp.experts.{param}


def _targets(model: MoEModel, spec: Any, expert_slots: Mapping[int, Sequence[int]] | None = None,
             skipped: set[str] | None = None) -> dict[str, Target]:
    """Every checkpoint name the model expects -> its target. With `expert_slots`, expert e of layer i
    goes to row expert_slots[i].index(e); other experts' names are added to `skipped`."""
    expected: dict[str, Target] = {}
    tied = model.config.tie_word_embeddings
    for name, param in model.state_dict(keep_vars=True).items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            slots = None if expert_slots is None else expert_slots.get(_expert_layer(name))
            row = {e: i for i, e in enumerate(slots)} if slots is not None else None
            # a compressed layer may hold fewer experts than the config; EP slots count the config's
            count = model.config.num_experts if slots is not None else param.shape[0]
            for hf_name, target in expert_checkpoint_names(name, count, spec):
                if row is None:
                    expected[hf_name] = target
                elif target.expert in row:
                    expected[hf_name] = Target(target.name, row[target.expert], target.part)
                elif skipped is not None:
                    skipped.add(hf_name)
        else:
            expected[to_checkpoint(name, spec)] = Target(name)
    return expected


def _restore_compressed(model: MoEModel, record: Any, root: Path,
                        expert_slots: Mapping[int, Sequence[int]] | None) -> None:
    """Reshape the MoE layers of a moeinfer-compressed checkpoint (config.json's moeinfer_compression)."""
    if not isinstance(record, dict) or not isinstance(record.get("layout"), dict):
        raise CheckpointError(f"{root}/config.json: moeinfer_compression must be a mapping with a 'layout'")
    if record.get("version") != RECORD_VERSION:
        raise CheckpointError(f"{root}/config.json: moeinfer_compression version {record.get('version')!r} is "
                              f"not supported (this moeinfer reads version {RECORD_VERSION})")
    if expert_slots is not None and not is_plain(record["layout"]):
        raise CheckpointError(f"{root}: expert parallelism needs plain experts with the same count in every "
                              "layer; this checkpoint's compression changed that (see moeinfer_compression)")
    try:
        restore_(model, record["layout"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{root}/config.json: bad moeinfer_compression layout: {e}") from e


def _keep_local_experts(model: MoEModel, expert_slots: Mapping[int, Sequence[int]]) -> None:
    """Rebuild (on meta) each listed MoE layer's experts with only the listed ones."""
    cfg = model.config
    blocks = {block.layer_idx: block for block in model.moe_blocks()}
    for layer, slots in expert_slots.items():
        if layer not in blocks:
            raise ValueError(f"expert_slots names layer {layer}, which is not an MoE layer "
                             f"(MoE layers: {sorted(blocks)})")
        bad = [e for e in slots if not 0 <= e < cfg.num_experts]
        if bad or len(set(slots)) != len(slots):
            raise ValueError(f"expert_slots[{layer}] = {list(slots)} must be distinct experts in 0..{cfg.num_experts - 1}")
        with meta_parameters():
            blocks[layer].experts = Experts(len(slots), cfg.hidden_size, cfg.moe_intermediate_size)


def _read_rows(f: SafetensorsFile, name: str, rows: Sequence[int], out: torch.Tensor, handle: Any) -> None:
    """Read rows `rows` of a stacked [E, ...] tensor into out [len(rows), ...]: a fused expert tensor
    under expert parallelism (only the local experts' bytes are read)."""
    entry = f.entries[name]
    if tuple(entry.shape[1:]) != tuple(out.shape[1:]):
        raise CheckpointError(f"{f.path}: tensor {name!r} has shape {list(entry.shape)}, expected "
                              f"[E, {', '.join(map(str, out.shape[1:]))}] from config.json")
    row_bytes = entry.nbytes // entry.shape[0]
    buf = torch.empty(entry.shape[1:], dtype=entry.dtype)
    view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
    for i, e in enumerate(rows):
        handle.seek(entry.offset + e * row_bytes)
        if row_bytes and handle.readinto(view) != row_bytes:
            raise CheckpointError(f"{f.path} is truncated while reading tensor {name!r}")
        out[i].copy_(buf)


def _checkpoint_dtype(hf: dict[str, Any], files: list[SafetensorsFile]) -> torch.dtype:
    name = hf.get("dtype") or hf.get("torch_dtype")
    if isinstance(name, str) and name in _DTYPE_NAMES:
        return _DTYPE_NAMES[name]
    for f in files:
        for entry in f.entries.values():
            if entry.dtype.is_floating_point:
                return entry.dtype
    return torch.float32


def load_checkpoint(path: str | os.PathLike[str], *, device: torch.device | str = "cpu",
                    dtype: torch.dtype | str | None = None, progress: bool = True,
                    expert_slots: Mapping[int, Sequence[int]] | None = None,
                    on_expert_error: str = "raise", check_weights: bool = False,
                    experts_on_disk: bool = False, check_memory: bool = True) -> MoEModel:
    """Load a local HF-format MoE checkpoint directory; see the module docstring for the steps.

    expert_slots: {MoE layer index: experts to keep, in row order}; those layers hold only these
    experts (the expert-parallel loader passes this rank's experts).
    on_expert_error: "raise" (default), or "mask": a routed expert whose tensors are missing, of the
    wrong shape or not finite is zeroed and masked in its router (graceful degradation); the model's
    `failed_experts` maps (layer, expert) to the reason. Any other bad tensor still raises.
    check_weights: scan every floating-point weight for NaN/Inf after reading and raise a CheckpointError
    naming the tensors (one pass over the weights; experts left on disk are not scanned).
    experts_on_disk: leave the routed experts in the files (module docstring); the model runs only once
    `offload_` gives it a slow tier over them (moeinfer.load(path, offload=...) does both).
    check_memory: refuse (CheckpointError) when the weights to allocate exceed the memory free now."""
    if experts_on_disk and (expert_slots is not None or on_expert_error != "raise"):
        raise ValueError("experts_on_disk cannot be combined with expert_slots or on_expert_error='mask'")
    if on_expert_error not in ("raise", "mask"):
        raise ValueError(f"on_expert_error must be 'raise' or 'mask', got {on_expert_error!r}")
    if on_expert_error == "mask" and expert_slots is not None:
        raise ValueError("on_expert_error='mask' cannot be combined with expert_slots")
    from tqdm.auto import tqdm

    device = parse_device(device)  # before any reading
    root = Path(path)
    hf = read_config(root)
    paths, weight_map = shard_files(root)
    files = [SafetensorsFile(p) for p in paths]
    _check_counts(hf, files, root)
    config = model_config(hf, root / "config.json")
    spec = get_arch(config.model_type)
    target_dtype = parse_dtype(dtype) or _checkpoint_dtype(hf, files)

    # A model entirely on the meta device (nothing allocated, not even transiently) to check the files against
    with torch.device("meta"):
        model = _build(config, hf, root, expert_slots)
    skipped: set[str] = set()
    expected = _targets(model, spec, expert_slots, skipped)
    partial = {f"layers.{layer}.mlp.experts.{p}": list(slots) for layer, slots in (expert_slots or {}).items()
               for p in ("gate_up_proj", "down_proj")}

    # Map what the files hold, then read file by file in offset order.
    by_param: dict[str, list[str]] = defaultdict(list)
    for name, target in expected.items():
        by_param[target.name].append(name)
    plan: dict[Path, list[tuple[str, Target]]] = defaultdict(list)
    covered: set[str] = set()
    unexpected: list[str] = []
    for f in files:
        for name in f.entries:
            if name in expected:
                plan[f.path].append((name, expected[name]))
                covered.add(name)
                continue
            alt = to_internal(name, spec)  # e.g. a fused [E, 2I, D] tensor of a transformers-v5 save
            if alt.expert is None and alt.name in by_param:
                plan[f.path].append((name, alt))
                covered.update(by_param[alt.name])
            elif name not in skipped:
                unexpected.append(name)
    missing = [n for n in expected if n not in covered]
    failed: dict[tuple[int, int], str] = {}
    if on_expert_error == "mask":
        for n in [n for n in missing if expected[n].expert is not None]:
            failed[(_expert_layer(expected[n].name), expected[n].expert)] = f"tensor {n} is missing"
            missing.remove(n)
    if missing:
        where = {n: weight_map.get(n, "no shard in the index") if weight_map else paths[0].name
                 for n in missing[:5]}
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {root} is missing tensor(s) "
                              + ", ".join(f"{n} (expected in {w})" for n, w in where.items()) + more)
    surprising = sorted(n for n in unexpected if not _ignorable(n, config))
    if surprising:
        log.warning("%s: ignoring %d tensor(s) the model does not use: %s", root, len(surprising),
                    ", ".join(surprising[:8]))
    # Every shape and dtype is checked against the (meta) model before anything is allocated, so a config
    # that disagrees with the files (vocab_size: 1e9) is named instead of allocating what it implies.
    _check_plan(model.state_dict(keep_vars=True), files, plan, partial, failed if on_expert_error == "mask" else None)
    with meta_parameters():  # the model to fill: parameters on meta, buffers (RoPE tables) real
        model = _build(config, hf, root, expert_slots)
    on_disk = _experts_left_on_disk(model, root, target_dtype) if experts_on_disk else None
    skip = frozenset(id(p) for b in model.moe_blocks() for p in b.experts.parameters()) if on_disk else frozenset()
    if check_memory:
        check_fits(_allocation_bytes(model, target_dtype, skip), device, root)
    _materialize(model, target_dtype, device, skip)
    params = model.state_dict(keep_vars=True)
    moe_pos = {b.layer_idx: i for i, b in enumerate(model.moe_blocks())}
    total = sum(f.entries[n].nbytes * len(partial[t.name]) // f.entries[n].shape[0]
                if t.expert is None and t.name in partial else f.entries[n].nbytes
                for f in files for n, t in plan[f.path] if on_disk is None or not _is_expert_param(t.name))
    staging = torch.empty(STAGING_BYTES, dtype=torch.uint8)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {root.name}",
              disable=not progress or None) as bar:
        for f in files:
            with open(f.path, "rb") as handle:
                for name, target in sorted(plan[f.path], key=lambda nt: f.entries[nt[0]].offset):
                    if on_disk is not None and _is_expert_param(target.name):
                        _record_expert(on_disk, f, name, target, moe_pos[_expert_layer(target.name)])
                        continue
                    with torch.no_grad():
                        if target.expert is None and target.name in partial:
                            _read_rows(f, name, partial[target.name], params[target.name], handle)
                        elif on_expert_error == "mask" and target.expert is not None:
                            if (_expert_layer(target.name), target.expert) in failed:
                                bar.update(f.entries[name].nbytes)
                                continue
                            try:
                                f.read_into(name, target.view(params[target.name]), handle, staging)
                            except CheckpointError as e:
                                failed[(_expert_layer(target.name), target.expert)] = str(e)
                        else:
                            f.read_into(name, target.view(params[target.name]), handle, staging)
                    bar.update(f.entries[name].nbytes)
    if on_expert_error == "mask":
        _mask_failed_experts(model, failed)
    if on_disk is not None:
        on_disk.check_complete()
        model.expert_files = on_disk
    if check_weights:
        check_finite(model, root)
    model.eval()
    model.requires_grad_(False)
    model.source_dir = str(root)

    model.tokenizer = Tokenizer.from_dir(root)
    return model


def _is_expert_param(name: str) -> bool:
    return name.endswith((".experts.gate_up_proj", ".experts.down_proj"))


def _experts_left_on_disk(model: MoEModel, root: Path, dtype: torch.dtype) -> ExpertFiles:
    """The (empty) record of where the experts lie; the MoE layers must hold plain stacked experts."""
    blocks = model.moe_blocks()
    if not blocks:
        raise CheckpointError(f"checkpoint {root} has no MoE layers: no experts to leave on disk")
    kinds = {type(b.experts).__name__ for b in blocks}
    if kinds != {"Experts"}:
        raise CheckpointError(f"checkpoint {root}: experts left on disk must be plain stacked experts; this "
                              f"checkpoint holds {', '.join(sorted(kinds))} (load it whole, or offload after loading)")
    shapes = {(tuple(b.experts.gate_up_proj.shape), tuple(b.experts.down_proj.shape)) for b in blocks}
    if len(shapes) != 1:
        raise CheckpointError(f"checkpoint {root}: MoE layers have experts of different shapes {sorted(shapes)}")
    (gu, dn), = shapes
    return ExpertFiles(root=root, num_layers=len(blocks), num_experts=gu[0], gate_up_shape=(gu[1], gu[2]),
                       down_shape=(dn[1], dn[2]), dtype=dtype)


def _record_expert(out: ExpertFiles, f: SafetensorsFile, name: str, target: Target, pos: int) -> None:
    """Where tensor `name` (one expert's part, or a fused [E, ...] tensor: one row per expert) lies."""
    entry = f.entries[name]
    if target.expert is not None:
        out.add((pos, target.expert), ExpertPart(f.path, entry.offset, entry.nbytes, entry.dtype, str(target.part)))
        return
    part = "down" if target.name.endswith("down_proj") else "gate_up"
    row = entry.nbytes // entry.shape[0]
    for e in range(entry.shape[0]):
        out.add((pos, e), ExpertPart(f.path, entry.offset + e * row, row, entry.dtype, part))


def _build(config: Any, hf: dict[str, Any], root: Path,
           expert_slots: Mapping[int, Sequence[int]] | None) -> MoEModel:
    """The model config.json describes, including a saved compression layout and routing mode."""
    model = MoEModel(config)
    record = hf.get("moeinfer_compression")
    if record is not None:
        _restore_compressed(model, record, root, expert_slots)
    if hf.get("moeinfer_routing") is not None:  # a dynamic-gating mode saved with the model
        set_routing_(model, hf["moeinfer_routing"])
    if expert_slots is not None:
        _keep_local_experts(model, expert_slots)
    return model


def _check_counts(hf: dict[str, Any], files: list[SafetensorsFile], root: Path) -> None:
    """Layer and expert counts that the files cannot hold are refused before anything of that size is built
    (config.json's values, read before the adapter makes per-layer tuples of them)."""
    n = sum(len(f.entries) for f in files)
    widest = max((e.shape[0] for f in files for e in f.entries.values() if e.shape), default=0)
    layers = hf.get("num_hidden_layers")
    if isinstance(layers, (int, float)) and layers > n:
        raise CheckpointError(f"{root}/config.json: num_hidden_layers={layers}, but the checkpoint "
                              f"holds only {n} tensors")
    for field in EXPERT_COUNTS:
        experts = hf.get(field)
        if isinstance(experts, (int, float)) and experts > max(n, widest):
            raise CheckpointError(f"{root}/config.json: {field}={experts} experts, but the checkpoint's {n} "
                                  "tensors cannot hold that many")


def _check_plan(params: dict[str, torch.Tensor], files: list[SafetensorsFile],
                plan: dict[Path, list[tuple[str, Target]]], partial: dict[str, list[int]],
                failed: dict[tuple[int, int], str] | None) -> None:
    """Each planned tensor's shape and dtype kind against its (meta) parameter; `failed` (mask mode) collects
    bad routed experts instead of raising."""
    for f in files:
        for name, target in plan[f.path]:
            entry, param = f.entries[name], params[target.name]
            if target.expert is None and target.name in partial:
                want = (max(partial[target.name]) + 1, *param.shape[1:])
                ok = entry.shape[1:] == want[1:] and entry.shape[:1] >= want[:1]
            else:
                want = tuple(target.view(param).shape)
                ok = entry.shape == want
            problem = None
            if not ok:
                problem = (f"{f.path}: tensor {name!r} has shape {list(entry.shape)}, expected {list(want)} "
                           "from config.json")
            elif entry.dtype.is_floating_point != param.is_floating_point() or (
                    not param.is_floating_point() and entry.dtype != param.dtype):
                problem = (f"{f.path}: tensor {name!r} is stored as {entry.dtype_label}, but its parameter holds "
                           f"{'floating-point' if param.is_floating_point() else str(param.dtype)} values")
            if problem is None:
                continue
            if failed is not None and target.expert is not None:
                failed[(_expert_layer(target.name), target.expert)] = problem
            else:
                raise CheckpointError(problem)


def check_finite(model: MoEModel, where: Path | str) -> None:
    """Raise a CheckpointError naming the weights that hold NaN or Inf (checked a chunk at a time)."""
    bad: list[str] = []
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or t.is_meta:  # experts left on disk are not read here
            continue
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), 1 << 24):
            if not torch.isfinite(flat[start:start + (1 << 24)]).all():
                bad.append(name)
                break
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(f"checkpoint {where}: weights hold NaN or Inf in {', '.join(bad[:5])}{more} "
                              "(--no-check-weights / check_weights=False loads them anyway)")


def _mask_failed_experts(model: MoEModel, failed: dict[tuple[int, int], str]) -> None:
    """Find experts with non-finite weights too; zero every failed expert and mask it in its router."""
    for block in model.moe_blocks():
        ex = block.experts
        finite = (torch.isfinite(ex.gate_up_proj).flatten(1).all(1) & torch.isfinite(ex.down_proj).flatten(1).all(1))
        for e in (~finite).nonzero().flatten().tolist():
            failed.setdefault((block.layer_idx, e), "weights are not finite")
    blocks = {b.layer_idx: b for b in model.moe_blocks()}
    for (layer, e), reason in sorted(failed.items()):
        with torch.no_grad():
            blocks[layer].experts.gate_up_proj[e].zero_()
            blocks[layer].experts.down_proj[e].zero_()
        try:
            blocks[layer].gate.mask_expert(e)
        except ValueError as err:
            raise CheckpointError(f"layer {layer}: expert {e} failed to load ({reason}) and {err}") from None
        log.warning("layer %d expert %d is masked: %s", layer, e, reason)
    model.failed_experts = dict(sorted(failed.items()))


def _ignorable(name: str, config: Any) -> bool:
    """Tensors real checkpoints carry that the model rightly does not use."""
    if name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight"):
        return True
    # DeepSeek-V3 checkpoints carry multi-token-prediction layers past num_hidden_layers.
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() \
        and int(parts[2]) >= config.num_layers
