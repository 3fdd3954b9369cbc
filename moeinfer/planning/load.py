"""`load_planned(path, plan)`: load a checkpoint straight into a plan, so a model bigger than memory runs.

`moeinfer.load` followed by `apply_plan_` reads every expert into memory before `offload_` moves it to
the slow tier: a checkpoint bigger than memory is refused (or, without the loader's memory check,
killed). Here:
1. the plan: a Plan, a plan YAML file, or "auto" (planned now for the memory free on the device; the
   planner sizes the model from config.json and the safetensors headers only);
2. a plan that offloads float experts to disk on a CPU loads the dense weights only and uses the
   checkpoint's own files as the disk tier (`moeinfer.load(path, offload=...)`: no expert is read
   until the cache loads it, nothing is written); peak memory is the dense weights plus the cache;
   the plan's kernel 'cpu' is then set on the offloaded experts and the dense path put on the native
   CPU kernels where they are built, as `apply_plan_` does;
3. any other plan (resident, quantized, host-memory tier) loads the model whole (the loader refuses
   with a clear error when it does not fit) and applies the plan (`apply_plan_`);
4. `model.plan` records the plan either way.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from moeinfer.api import load
from moeinfer.kernels import use_kernel_
from moeinfer.models import resolve_model_path
from moeinfer.planning.apply import apply_plan_
from moeinfer.planning.dense import use_planned_dense_
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
    """Whether a plan loads with its experts left in the checkpoint (step 2)."""
    return (plan.offload is not None and plan.offload.tier == "disk" and device == "cpu"
            and all(p == FLOAT for p in plan.precisions))


def load_planned(path: str | os.PathLike[str], plan: Plan | str | os.PathLike[str], *,
                 device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None,
                 offload_dir: str | os.PathLike[str] | None = None, progress: bool = True,
                 check_weights: bool = False) -> Any:
    """Load checkpoint `path` under `plan` (steps in the module docstring); returns the model.
    `offload_dir`: the disk tier's folder for plans that write an expert store (quantized experts)."""
    dev = "cuda" if str(device).startswith("cuda") else "cpu"
    chosen = resolve_plan(path, plan, device=dev, progress=progress)
    if chosen.device != dev:
        raise PlanError(f"the plan was made for device {chosen.device!r}; loading on {device!r}")
    if streams_experts(chosen, dev):
        # 2. dense weights only; the checkpoint is the disk tier
        assert chosen.offload is not None
        root = resolve_model_path(path)
        model = load(root, device=device, dtype=dtype, progress=progress, check_weights=check_weights,
                     offload=chosen.offload.config(offload_dir=root))
        if len(model.moe_blocks()) != len(chosen.precisions):
            model.offload.close()
            raise PlanError(f"plan for {chosen.model} lists {len(chosen.precisions)} MoE layers; this model has "
                            f"{len(model.moe_blocks())}")
        if chosen.kernel == "cpu":  # offloaded float experts run the plan's kernel (as apply_plan_)
            use_kernel_(model, "cpu")
        use_planned_dense_(model)
        model.plan = chosen  # 4.
        return model
    # 3. whole, then the plan
    model = load(path, device=device, dtype=dtype, progress=progress, check_weights=check_weights)
    return apply_plan_(model, chosen, offload_dir=offload_dir, progress=progress)
