"""`apply_plan_(model, plan)`: put a plan into effect on a loaded model, through the public transforms.

1. check the plan fits the model (one precision per MoE layer);
2. `compress_`: each layer's experts at the plan's precision (the `quantize_layers` step; float
   layers are left as they are);
3. `offload_`: the plan's offload settings (a new temporary folder for a disk tier unless
   `offload_dir` is given);
4. `use_kernel_`: the plan's kernel (float experts that stay resident run it, offloaded float
   experts 'reference' or 'cpu'; quantized experts run their own expert stage; offloaded quantized
   experts on a CPU run 'cpu': the native quantized kernels on the cached codes where they are built);
5. the dense path (attention, norms, LM head) on the native CPU kernels where they are built
   (`use_planned_dense_`, moeinfer/planning/dense.py: the path the machine profile priced);
6. `model.plan` records the plan, so a benchmark can set its predictions beside what it measures.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from moeinfer.planning.dense import use_planned_dense_
from moeinfer.planning.spec import FLOAT, Plan, PlanError
from moeinfer.compress.api import compress_
from moeinfer.kernels import use_kernel_
from moeinfer.offload.apply import offload_


def quantize_step(plan: Plan) -> dict[str, Any] | None:
    """The compress_ step of a plan (None when every layer stays in float)."""
    if all(p == FLOAT for p in plan.precisions):
        return None
    return {"method": "quantize_layers", "precisions": ["none" if p == FLOAT else p for p in plan.precisions]}


def check_plan_fits(model: Any, plan: Plan) -> None:
    """Step 1: one precision per MoE layer of `model` (a PlanError naming both counts otherwise)."""
    blocks = model.moe_blocks()
    if len(blocks) != len(plan.precisions):
        raise PlanError(f"plan for {plan.model} lists {len(plan.precisions)} MoE layers; this model has {len(blocks)}")


def apply_plan_(model: Any, plan: Plan | str | os.PathLike[str], *, offload_dir: str | os.PathLike[str] | None = None,
                progress: bool = False) -> Any:
    """Apply `plan` (a Plan or a plan YAML file) to `model` in place (steps above); returns the model."""
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    # 1. fit
    check_plan_fits(model, plan)
    # 2. precision
    step = quantize_step(plan)
    if step is not None:
        compress_(model, [step], progress=progress)
    return finish_plan_(model, plan, offload_dir=offload_dir, progress=progress)


def finish_plan_(model: Any, plan: Plan, *, offload_dir: str | os.PathLike[str] | None = None,
                 progress: bool = False) -> Any:
    """Steps 3-6 on a model whose experts are at the plan's precisions (`apply_plan_` after `compress_`,
    `load_planned` after quantizing while loading, or with its float experts left in the checkpoint)."""
    blocks = model.moe_blocks()
    # 3. placement
    if plan.offload is not None:
        folder = offload_dir
        if plan.offload.tier == "disk" and folder is None:
            folder = tempfile.mkdtemp(prefix="moeinfer-experts-")
        offload_(model, plan.offload.config(offload_dir=folder), progress=progress)
    # 4. kernel
    if plan.offload is None or plan.kernel in ("auto", "reference"):
        if any(type(b.experts).__name__ == "Experts" for b in blocks):
            use_kernel_(model, plan.kernel, fp32_weights=plan.fp32_weights)
    if plan.offload is not None and plan.precisions[0] == FLOAT and plan.kernel == "cpu":
        use_kernel_(model, "cpu")  # offloaded float experts run the CPU kernel on each cached expert
    if plan.offload is not None and plan.precisions[0] != FLOAT and model.device.type == "cpu":
        # offloaded codes run the native quantized kernels where built (else their eager reference), as
        # the resident preset the machine profile measured does
        use_kernel_(model, "cpu")
    # 5. dense path
    use_planned_dense_(model)
    # 6. record
    model.plan = plan
    return model
