"""`apply_plan_(model, plan)`: put a plan into effect on a loaded model, through the public transforms.

1. check the plan fits the model (one precision per MoE layer);
2. `compress_`: each layer's experts at the plan's precision (the `quantize_layers` step; float
   layers, and layers quantized already at the plan's bits and group size — a planned model saved
   and loaded again — are left as they are);
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
from typing import Any

from moeinfer.fsutil import scratch_dir
from moeinfer.planning.dense import use_planned_dense_
from moeinfer.planning.spec import FLOAT, Plan, PlanError
from moeinfer.compress.api import compress_
from moeinfer.compress.methods.quantize_layers import layer_quantizer
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.kernels import use_kernel_
from moeinfer.offload.apply import offload_


def quantize_step(plan: Plan, model: Any = None) -> dict[str, Any] | None:
    """The compress_ step of a plan (None when no layer is to be quantized). With `model`, a layer whose
    experts are quantized already at the plan's bits and group size is left as it is (`at_precision`),
    so a planned model saved once and loaded again is not quantized a second time."""
    precisions = ["none" if p == FLOAT else p for p in plan.precisions]
    if model is not None:
        precisions = ["none" if at_precision(b.experts, p) else p for b, p in zip(model.moe_blocks(), precisions)]
    if all(p == "none" for p in precisions):
        return None
    return {"method": "quantize_layers", "precisions": precisions}


def at_precision(experts: Any, precision: str) -> bool:
    """Whether `experts` are quantized experts of every expert at `precision`'s bits and group size (a
    quantize preset name; "none" -> False)."""
    q = None if precision == "none" else layer_quantizer(precision)
    return (q is not None and isinstance(experts, QuantizedExperts) and set(experts.bits) == {q.bits}
            and experts.group_size == q.group_size)


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
    # 2. precision (layers at it already, a planned model saved and loaded again, are kept)
    step = quantize_step(plan, model)
    if step is not None:
        compress_(model, [step], progress=progress)
    return finish_plan_(model, plan, offload_dir=offload_dir, progress=progress)


def finish_plan_(model: Any, plan: Plan, *, offload_dir: str | os.PathLike[str] | None = None,
                 scratch: bool = False, progress: bool = False) -> Any:
    """Steps 3-6 on a model whose experts are at the plan's precisions (`apply_plan_` after `compress_`,
    `load_planned` after quantizing while loading, or with its float experts left in the checkpoint);
    `scratch`: `offload_dir` is a scratch folder the runtime deletes when it closes."""
    blocks = model.moe_blocks()
    # 3. placement
    if plan.offload is not None:
        folder = offload_dir
        if plan.offload.tier == "disk" and folder is None:
            folder, scratch = scratch_dir("moeinfer-experts-"), True
        config = plan.offload.config(offload_dir=folder)
        config.remove_offload_dir = scratch
        offload_(model, config, progress=progress)
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
