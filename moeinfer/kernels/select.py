"""`use_kernel_(model, name)`: choose the expert-stage kernel of every MoE block of a loaded model,
in place (the model knows nothing of kernels; like torchao's `quantize_`, applied after loading).
"""

from __future__ import annotations

import torch
from torch import nn

from moeinfer.kernels.linear import use_cpu_linears_
from moeinfer.kernels.registry import resolve


def use_kernel_(model: nn.Module, name: str = "auto", *, fp32_weights: bool = False,
                linears: bool = False) -> nn.Module:
    """Select kernel `name` ('auto', 'reference', 'cpu', 'triton') for every MoE block; returns model.

    linears: also run the model's bf16 dense linears (attention, shared expert, lm_head) on the native
    CPU kernels (moeinfer.kernels.linear.use_cpu_linears_); RuntimeError when they are not built.

    fp32_weights: keep an fp32 copy of the expert weights and compute the experts in fp32. On CPUs
    without native bf16 matmul (AVX2) this is much faster for a bf16 model, at the cost of 2x the
    expert weight bytes *in addition to* the bf16 weights (3x in all). The copy is a snapshot: call
    use_kernel_ again after anything that changes the expert weights. Ignored for 'reference'.
    """
    if linears:
        use_cpu_linears_(model)
    blocks = [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "kernel_fn")]
    if not blocks:
        # Compressed (quantized, low-rank) or offloaded experts run their own expert stage.
        others = sorted({type(b.experts).__name__ for b in getattr(model, "moe_blocks", list)()})
        if name in ("auto", "reference") and others:
            return model
        raise ValueError(f"use_kernel_: kernel {name!r} runs plain stacked experts; this model's MoE layers hold "
                         f"{', '.join(others) or 'no experts'}, which run their own expert stage "
                         "(use --kernel auto or reference)")
    device = blocks[0].gate_up_proj.device
    spec = resolve(name, device)
    for experts in blocks:
        experts.kernel = spec.name
        experts.kernel_fn = None if spec.name == "reference" else spec.fn
        experts.compute_weights = None
        if fp32_weights and spec.name != "reference" and experts.gate_up_proj.dtype != torch.float32:
            experts.compute_weights = (experts.gate_up_proj.detach().float(), experts.down_proj.detach().float())
    return model


def kernel_names(model: nn.Module) -> set[str]:
    """The kernels the model's MoE blocks use now."""
    return {m.kernel for m in model.modules() if hasattr(m, "kernel_fn")}
