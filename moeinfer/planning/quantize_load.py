"""Quantize while loading: each MoE layer's float experts read from the checkpoint, quantized, dropped.

Shapes: E experts, D hidden, I expert inner size; one layer's experts = gate_up [E, 2I, D] + down [E, D, I].

A model loaded with its routed experts left in the checkpoint (`load_checkpoint(..., experts_on_disk=True)`:
meta expert tensors, every expert's byte ranges in `model.expert_files`) is brought to a plan's
precisions without ever holding more than one layer of float experts (the streaming quantization that
llama.cpp's `llama-quantize` does tensor by tensor, here into the running model):
1. check the memory the result takes (dense weights are in already; quantized experts, float layers
   kept, and one float layer being quantized) against the memory free now: a clear error instead of
   the process being killed half-way;
2. per MoE layer, `compress_`'s own `quantize_layers` step with `fill` (moeinfer.compress.methods.
   quantize_layers): `read_layer_experts` reads the layer's experts from the checkpoint, expert by
   expert at their byte ranges (`CheckpointStore.read`, the disk tier's reader: converted to the
   model's dtype exactly as the loader converts), into one new stacked `Experts`; the step quantizes it
   at the layer's precision (the same code and "auto" algorithm choice as `compress_`) and the float
   copy is freed when the quantized module replaces it; float layers of a mixed plan stay resident;
   with `store_dir` (a plan that offloads its quantized experts to disk), each layer, once quantized,
   is written to the expert store there (`StoreWriter`: the bytes `offload_` would write) and its
   codes are freed (meta tensors), so one layer of quantized experts is in memory at a time too and a
   model whose quantized experts exceed memory loads; `model.expert_store_dir` tells `offload_` where
   the store is (a failure on the way deletes the layers written);
3. record the step in the model's config as `compress_` does (`record_compression_`), so the model
   equals `load` + `compress_`'s: its layout, summary and kernel choice;
4. close the checkpoint files and drop `model.expert_files` (no expert is left in the checkpoint).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeinfer.compress.api import CompressionReport, as_recipe, record_compression_, step_record, weight_bytes
from moeinfer.compress.methods.quantize_layers import KEEP
from moeinfer.compress.registry import get_method
from moeinfer.loading.expert_files import ExpertFiles, memory_available
from moeinfer.model.moe import Experts
from moeinfer.offload.checkpoint_store import CheckpointStore
from moeinfer.offload.packed import PackedFormat, midpoint_zeros
from moeinfer.offload.store import StoreWriter
from moeinfer.planning.costs import expert_bytes
from moeinfer.planning.sizes import sizes_from_model
from moeinfer.planning.spec import FLOAT, PlanError


def read_layer_experts(store: CheckpointStore, position: int) -> Experts:
    """MoE layer `position`'s experts, read from the checkpoint into a new stacked Experts (step 2)."""
    files: ExpertFiles = store.files
    (two_i, D), (_, inner) = files.gate_up_shape, files.down_shape
    with torch.device("meta"):
        ex = Experts(files.num_experts, D, inner)
    ex.gate_up_proj = nn.Parameter(torch.empty(files.num_experts, two_i, D, dtype=files.dtype), requires_grad=False)
    ex.down_proj = nn.Parameter(torch.empty(files.num_experts, D, inner, dtype=files.dtype), requires_grad=False)
    with torch.no_grad():
        for e in range(files.num_experts):
            store.read((position, e), ex.gate_up_proj.data[e], ex.down_proj.data[e])
    return ex


def check_room(model: Any, precisions: list[str], *, spilled: bool = False) -> None:
    """Step 1: quantized experts + float layers kept + one float layer being quantized must fit in the
    memory free now (the dense weights are loaded already); `spilled`: each quantized layer is written
    to the expert store once made, so one quantized layer is held instead of all."""
    files: ExpertFiles = model.expert_files
    sizes = sizes_from_model(model)  # the model's dtype: a float layer takes what the loader allocates
    float_layer = files.num_experts * files.expert_bytes
    layers = [float_layer if p == KEEP else files.num_experts * expert_bytes(sizes, p) for p in precisions]
    need = float_layer + (max(layers) if spilled else sum(layers))
    free = memory_available("cpu")
    if need > free:
        kept = sum(p == KEEP for p in precisions)
        held = ("one quantized layer before it is written to the expert store" if spilled else
                f"{len(precisions) - kept} quantized layers, {kept} {FLOAT} layers kept")
        raise PlanError(f"quantizing {files.root} while loading needs {need / 1e9:.1f} GB for its experts "
                        f"({held}, one {FLOAT} layer being quantized) beside its dense weights, but only "
                        f"{free / 1e9:.1f} GB is available: plan for less memory (`moeinfer plan --memory ...`), "
                        "or free memory")


def store_bytes(model: Any, precisions: list[str]) -> int:
    """Bytes of the expert store of `precisions` (quantized layers only; written by step 2)."""
    files: ExpertFiles = model.expert_files
    sizes = sizes_from_model(model)
    return sum(files.num_experts * expert_bytes(sizes, p) for p in precisions)


def spill_(writer: StoreWriter, position: int, block: Any) -> bool:
    """Step 2 with `store_dir`: write layer `position`'s quantized experts to the store, free their codes;
    returns whether the codes are symmetric (every zero a midpoint: offload_ then skips reading them)."""
    packed = PackedFormat.of(block.experts)
    gate_up, down = packed.stacked(block.experts)
    writer.write(position, gate_up, down)
    symmetric = midpoint_zeros(block.experts)
    del gate_up, down
    block.experts.to("meta")
    return symmetric


def quantize_from_checkpoint_(model: Any, step: dict[str, Any], *, progress: bool = False,
                              store_dir: str | os.PathLike[str] | None = None) -> Any:
    """Bring `model`'s experts, left in the checkpoint, to the precisions of `step` (a plan's
    `quantize_layers` step: `moeinfer.planning.apply.quantize_step`) in place (steps in the module
    docstring); `store_dir`: write each quantized layer to an expert store there (every layer must be
    quantized); returns the model."""
    files = getattr(model, "expert_files", None)
    if files is None:
        raise PlanError("quantizing while loading needs a model loaded with its experts left in the checkpoint "
                        "(load_checkpoint(..., experts_on_disk=True))")
    recipe = as_recipe([step])
    method = get_method(recipe.steps[0].method)
    if method.name != "quantize_layers":
        raise PlanError(f"quantizing while loading runs the quantize_layers step, not {method.name!r}")
    params = method.make_params(recipe.steps[0].params, where="step 1: ")
    precisions = list(params.precisions)
    if store_dir is not None and KEEP in precisions:
        raise PlanError("an expert store is written for quantized layers only; this plan keeps "
                        f"{precisions.count(KEEP)} layers in {FLOAT}")
    # 1. room
    check_room(model, precisions, spilled=store_dir is not None)
    report = CompressionReport(recipe=recipe, bytes_before=weight_bytes(model))
    writer = (StoreWriter(store_dir, len(precisions), need=store_bytes(model, precisions))
              if store_dir is not None else None)
    store = CheckpointStore(files)
    try:
        # 2. layer by layer (the step's own checks first: a bad precision or count changes nothing)
        def fill(position: int, block: Any) -> None:
            block.experts = read_layer_experts(store, position)

        symmetric: list[bool] = []
        done = ((lambda position, block: symmetric.append(spill_(writer, position, block)))
                if writer is not None else None)
        summary = method.fn(model, params, None, progress=progress, fill=fill, done=done)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        store.close()
    if store_dir is not None:
        model.expert_store_dir = Path(store_dir)
        model.expert_store_midpoints = bool(symmetric) and all(symmetric)  # offload_ then skips the zeros
    # 3. record
    report.steps.append(step_record(method.name, params, summary))
    record_compression_(model, report)
    # 4. no expert left in the checkpoint
    del model.expert_files
    return model
