"""The shape of a compressed model, recorded in its config so a checkpoint rebuilds itself on load.

A compressed checkpoint's config.json carries `moeinfer_compression`:

    {"version": 1,
     "steps":  [{"method": "prune_reap", "params": {...}, "summary": {...}}, ...],
     "layout": {"<layer>": {"num_experts": 6, "kind": "experts", "params": {...}}, ...}}

`kind` names a registered experts module ("experts" is the plain stacked one; quantized and
low-rank experts register their own), `params` is what its `empty()` needs to build it on the meta
device. Loading builds the plain model, then `restore_()` reshapes each MoE layer from the layout
before any tensor is read, so the loader fills the compressed tensors by name.

Non-expert modules a method replaced (quantize's scope "all": QuantizedLinear) are listed under the
reserved key `layout["modules"]` = {"<module path>": {"kind": ..., "params": {...}}}; such a
checkpoint is moeinfer-format only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from moeinfer.formats.errors import CompressionError
from moeinfer.formats.kinds import KINDS, MODULE_KINDS, ExpertsKind, register_experts_kind, register_module_kind
# The stored experts and module kinds register themselves in formats.kinds when imported:
from moeinfer.formats.lowrank_experts import LowRankExperts
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.formats.quantized_linear import QuantizedLinear
from moeinfer.model.meta import meta_parameters
from moeinfer.model.moe import Experts, MoEBlock
from moeinfer.model.transformer import MoEModel

__all__ = ["EXPERT_COUNT_KEYS", "KINDS", "MODULES_KEY", "MODULE_KINDS", "RECORD_KEY", "RECORD_VERSION",
           "ExpertsKind", "LowRankExperts", "QuantizedExperts", "QuantizedLinear", "describe", "is_plain",
           "register_experts_kind", "register_module_kind", "replace_experts_", "restore_", "set_num_experts_",
           "sync_config_"]

RECORD_KEY = "moeinfer_compression"
RECORD_VERSION = 1
# config.json's expert-count field per family (transformers' names).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
MODULES_KEY = "modules"  # reserved layout key: replaced non-expert modules (see the module docstring)


def _kind_of(module: nn.Module) -> str:
    if type(module) is Experts:
        return "experts"
    kind = getattr(module, "kind", None)
    if kind not in KINDS:
        raise CompressionError(f"experts module {type(module).__name__} cannot be saved: it is not a registered "
                               f"experts kind (registered: experts, {', '.join(sorted(KINDS))})")
    return kind


def describe(model: MoEModel) -> dict[str, Any]:
    """The layout of every MoE layer: {layer: {num_experts, kind, params}}."""
    out: dict[str, Any] = {}
    for block in model.moe_blocks():
        kind = _kind_of(block.experts)
        params = {} if kind == "experts" else block.experts.layout_params()
        entry = {"num_experts": int(block.gate.weight.shape[0]), "kind": kind, "params": params}
        if getattr(block.gate, "expert_map", None) is not None:  # merged: router rows map onto fewer experts
            entry.update(num_experts=int(block.experts.num_experts), router_experts=entry["num_experts"],
                         expert_map=block.gate.expert_map.tolist())
        out[str(block.layer_idx)] = entry
    modules = {name: {"kind": m.kind, "params": m.layout_params()} for name, m in model.named_modules()
               if type(m) in MODULE_KINDS.values()}
    if modules:
        out[MODULES_KEY] = modules
    return out


def is_plain(layout: dict[str, Any]) -> bool:
    """Same expert count in every layer and plain experts: a checkpoint `transformers` loads."""
    if layout.get(MODULES_KEY):
        return False
    layers = [v for k, v in layout.items() if k != MODULES_KEY]
    counts = {v["num_experts"] for v in layers}
    return len(counts) == 1 and all(v["kind"] == "experts" and "expert_map" not in v for v in layers)


def set_num_experts_(block: MoEBlock, num_experts: int) -> None:
    """Give `block`'s router config `num_experts` (the router weight is replaced by the caller)."""
    cfg = block.gate.cfg
    if cfg.top_k > num_experts:
        raise CompressionError(f"layer {block.layer_idx}: {num_experts} experts cannot serve top_k={cfg.top_k}")
    n_group = cfg.n_group if num_experts % cfg.n_group == 0 else 1
    block.gate.cfg = dataclasses.replace(cfg, num_experts=num_experts, n_group=n_group,
                                         topk_group=min(cfg.topk_group, n_group))


def replace_experts_(block: MoEBlock, experts: nn.Module, router_weight: torch.Tensor,
                     correction_bias: torch.Tensor | None = None) -> None:
    """Swap a layer's experts and router rows (pruning, merging, sparse-to-dense)."""
    E = router_weight.shape[0]
    if getattr(experts, "num_experts", E) != E:
        raise CompressionError(f"layer {block.layer_idx}: {experts.num_experts} experts but {E} router rows")
    set_num_experts_(block, E)
    block.experts = experts
    block.gate.weight = nn.Parameter(router_weight.detach().clone(), requires_grad=False)
    if block.gate.e_score_correction_bias is not None:
        bias = correction_bias if correction_bias is not None else torch.zeros(E)
        block.gate.e_score_correction_bias = bias.detach().clone().to(block.gate.e_score_correction_bias)
    block.gate.available = None


def sync_config_(model: MoEModel) -> None:
    """After a structural step: if every layer has the same count, the config says it (HF-loadable)."""
    counts = {b.gate.weight.shape[0] for b in model.moe_blocks()}
    if len(counts) != 1:
        return
    (E,) = counts
    router = model.moe_blocks()[0].gate.cfg
    model.config = dataclasses.replace(model.config, router=router)
    for key in EXPERT_COUNT_KEYS:
        if key in model.config.hf_config:
            model.config.hf_config[key] = E
    for key in ("n_group", "topk_group"):
        if key in model.config.hf_config and model.config.hf_config[key] is not None:
            model.config.hf_config[key] = getattr(router, key)


def restore_(model: MoEModel, layout: dict[str, Any]) -> None:
    """Reshape a freshly built (meta) model's MoE layers as `layout` says; used by the loader."""
    modules = layout.get(MODULES_KEY) or {}
    layout = {k: v for k, v in layout.items() if k != MODULES_KEY}
    blocks = {str(b.layer_idx): b for b in model.moe_blocks()}
    if set(layout) != set(blocks):
        raise CompressionError(f"{RECORD_KEY}.layout names layers {sorted(layout, key=int)}, the model's MoE "
                               f"layers are {sorted(blocks, key=int)}")
    cfg = model.config
    for key, spec in layout.items():
        block, E, kind = blocks[key], int(spec["num_experts"]), spec.get("kind", "experts")
        if kind != "experts" and kind not in KINDS:
            raise CompressionError(f"{RECORD_KEY}.layout[{key}]: unknown experts kind {kind!r}; known: experts, "
                                   f"{', '.join(sorted(KINDS))}")
        with meta_parameters():
            if kind == "experts":
                experts: nn.Module = Experts(E, cfg.hidden_size, cfg.moe_intermediate_size)
            else:
                experts = KINDS[kind].empty(E, cfg, dict(spec.get("params") or {}))
            R = int(spec.get("router_experts", E))  # router rows (more than E for merged experts)
            set_num_experts_(block, R)
            block.gate.weight = nn.Parameter(torch.empty(R, cfg.hidden_size))
            if block.gate.e_score_correction_bias is not None:
                block.gate.e_score_correction_bias = torch.zeros(R)
        block.experts = experts
        if "expert_map" in spec:
            block.gate.expert_map = torch.tensor(spec["expert_map"], dtype=torch.long)
    for name, spec in modules.items():
        kind = spec.get("kind")
        if kind not in MODULE_KINDS:
            raise CompressionError(f"{RECORD_KEY}.layout.{MODULES_KEY}[{name}]: unknown module kind {kind!r}; "
                                   f"known: {', '.join(sorted(MODULE_KINDS)) or '(none)'}")
        parent, _, child = name.rpartition(".")
        with meta_parameters():
            module = MODULE_KINDS[kind].empty(cfg, dict(spec.get("params") or {}))
        setattr(model.get_submodule(parent) if parent else model, child, module)
