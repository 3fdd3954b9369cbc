"""`load_planned(path, plan)`: load a checkpoint straight into a plan, so a model bigger than memory runs.

`moeinfer.load` followed by `apply_plan_` reads every expert into memory before `compress_` quantizes
them and `offload_` moves them to the slow tier: a checkpoint bigger than memory is refused (or,
without the loader's memory check, killed). Here:
1. the plan: a Plan, a plan YAML file, or "auto" (planned now for the memory free on the device; the
   planner sizes the model from config.json and the safetensors headers only);
2. on a CPU, a plan that offloads float experts to disk, or that quantizes any layer, loads the dense
   weights only, its routed experts left in the checkpoint (`load_checkpoint(..., experts_on_disk=True)`:
   `model.expert_files` records every expert's byte ranges; nothing expert-sized is allocated):
   a. float experts offloaded to disk: the checkpoint's own files are the disk tier (no expert is read
      until the cache loads it, nothing is written); peak memory is the dense weights plus the cache;
   b. quantized layers (quantize while loading): layer by layer, that layer's float experts are read
      from the checkpoint's byte ranges (moeinfer.planning.quantize_load), quantized by `compress_`'s own
      `quantize_layers` step at the layer's precision, and dropped before the next layer is read (a
      mixed plan's float layers are read and kept resident); the step is recorded in the model's
      config as `compress_` records it. Peak memory: dense weights + quantized experts + one layer of
      float experts; a plan that offloads its quantized experts to disk writes each layer to the expert
      store in `offload_dir` once it is quantized and frees it, so its peak is the dense weights + one
      float layer + one quantized layer (then the cache);
   then the plan's placement, kernel, dense path and record exactly as `apply_plan_` runs them
   (`finish_plan_`), so the model equals `load` + `apply_plan_`'s (tests/plan/test_plan_quantize_load.py);
3. any other plan (every expert float, resident or in a host-memory tier; CUDA; a GGUF file), or a
   checkpoint whose experts are stored quantized or low-rank already (its config's
   `moeinfer_compression` layout: a planned model saved with `moeinfer.save` loads its quantized
   experts as they are, none quantized again), loads the model whole (the loader refuses with a clear
   error when it does not fit) and applies the plan (`apply_plan_`);
4. `model.plan` records the plan either way.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from moeinfer.api import load
from moeinfer.fsutil import remove_scratch, scratch_dir
from moeinfer.formats.layout import MODULES_KEY, RECORD_KEY
from moeinfer.loading.checkpoint import load_checkpoint, read_config
from moeinfer.loading.filetype import is_gguf
from moeinfer.models import resolve_model_path
from moeinfer.planning.apply import apply_plan_, check_plan_fits, finish_plan_, quantize_step
from moeinfer.planning.quantize_load import quantize_from_checkpoint_
from moeinfer.planning.spec import FLOAT, Plan, PlanError


def resolve_plan(path: str | os.PathLike[str], plan: Plan | str | os.PathLike[str], *, device: str = "cpu",
                 progress: bool = False) -> Plan:
    """Step 1: the plan object ("auto": planned now for the memory free on `device`)."""
    if isinstance(plan, Plan):
        return plan
    if str(plan) == "auto":
        # Imported here: the planner (profile, quality, search) is needed only for "auto".
        from moeinfer.planning.planner import plan as make_plan
        from moeinfer.planning.sizes import available_memory

        return make_plan(path, available_memory(device), device=device, progress=progress)
    return Plan.load(plan)


def streams_experts(plan: Plan, device: str) -> bool:
    """Whether a plan loads with its float experts left in the checkpoint as the disk tier (step 2a)."""
    return (plan.offload is not None and plan.offload.tier == "disk" and device == "cpu"
            and all(p == FLOAT for p in plan.precisions))


def stored_experts(root: Any) -> bool:
    """Whether checkpoint `root` holds experts of a stored kind other than plain (quantized, low-rank:
    its config's `moeinfer_compression` layout), which are loaded as they are (step 3)."""
    layout = read_config(root).get(RECORD_KEY, {}).get("layout", {})
    return any(entry.get("kind") != "experts" for key, entry in layout.items() if key != MODULES_KEY)


def quantizes_while_loading(plan: Plan, device: str) -> bool:
    """Whether a plan's quantized layers are quantized from the checkpoint layer by layer (step 2b)."""
    return device == "cpu" and any(p != FLOAT for p in plan.precisions)


def spills_quantized(plan: Plan) -> bool:
    """Whether a plan's quantized experts are written to its disk expert store layer by layer as they are
    made (step 2b: every layer quantized, offloaded to disk)."""
    return (plan.offload is not None and plan.offload.tier == "disk"
            and all(p != FLOAT for p in plan.precisions))


def load_planned(path: str | os.PathLike[str], plan: Plan | str | os.PathLike[str], *,
                 device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None,
                 offload_dir: str | os.PathLike[str] | None = None, progress: bool = True,
                 check_weights: bool = False) -> Any:
    """Load checkpoint `path` under `plan` (steps in the module docstring); returns the model.
    `offload_dir`: the disk tier's folder for plans that write an expert store (quantized experts;
    default: a new temporary folder)."""
    dev = "cuda" if str(device).startswith("cuda") else "cpu"
    chosen = resolve_plan(path, plan, device=dev, progress=progress)
    if chosen.device != dev:
        raise PlanError(f"the plan was made for device {chosen.device!r}; loading on {device!r}")
    root = resolve_model_path(path)
    streamed = streams_experts(chosen, dev)
    quantized = quantizes_while_loading(chosen, dev)
    if not is_gguf(root) and not stored_experts(root) and (streamed or quantized):
        # 2. dense weights only, the experts left in the checkpoint
        model = load_checkpoint(root, device=device, dtype=dtype, progress=progress, check_weights=check_weights,
                                experts_on_disk=True)
        check_plan_fits(model, chosen)
        folder, scratch = (root if streamed else offload_dir), False
        if quantized:  # b. layer by layer: read, quantize (float layers: read), drop (offloaded: write, drop)
            step = quantize_step(chosen)
            assert step is not None
            if spills_quantized(chosen) and folder is None:
                folder, scratch = scratch_dir("moeinfer-experts-"), True
            try:
                quantize_from_checkpoint_(model, step, progress=progress,
                                          store_dir=folder if spills_quantized(chosen) else None)
            except BaseException:
                if scratch:
                    remove_scratch(folder)
                raise
        # a. (float experts on disk) offload_ reads the checkpoint through model.expert_files
        return finish_plan_(model, chosen, offload_dir=folder, scratch=scratch, progress=progress)
    # 3. whole, then the plan
    model = load(path, device=device, dtype=dtype, progress=progress, check_weights=check_weights)
    return apply_plan_(model, chosen, offload_dir=offload_dir, progress=progress)
