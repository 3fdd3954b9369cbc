"""`use_kernel_(model, name)`: choose the expert-stage kernel of every MoE block of a loaded model,
in place (the model knows nothing of kernels; like torchao's `quantize_`, applied after loading).

Each block's experts module says which kernels it can run (`ExpertStage.kernels` in
moeinfer/model/moe.py: None = every registered kernel, for stacked float experts); a kernel a stage
cannot run is a ValueError naming the stage. The choice is remembered on the model
(`model.kernel_choice`), and `compress_` / `offload_` re-apply it to the experts modules they swap in
(`reapply_kernel_`), so the order of the transforms does not matter.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from moeinfer.kernels.attention import use_cpu_attention_
from moeinfer.kernels.linear import use_cpu_linears_
from moeinfer.kernels.norm import use_cpu_norms_
from moeinfer.kernels.rope import use_cpu_rope_
from moeinfer.kernels.router import use_cpu_router_
from moeinfer.kernels.registry import resolve

log = logging.getLogger(__name__)


def _stacked(model: nn.Module) -> list[nn.Module]:
    """Experts modules with stacked float weights: they run any registered kernel."""
    return [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "kernel_fn")]


def _own_stages(model: nn.Module) -> list[nn.Module]:
    """Experts modules that run their own expert stage (quantized, low-rank, offloaded, expert-parallel)."""
    blocks = getattr(model, "moe_blocks", list)()
    return [b.experts for b in blocks if not hasattr(b.experts, "kernel_fn")]


def use_kernel_(model: nn.Module, name: str = "auto", *, fp32_weights: bool = False,
                linears: bool = False) -> nn.Module:
    """Select kernel `name` ('auto', 'reference', 'cpu', 'triton') for every MoE block; returns model.

    linears: also run the model's dense path on the native CPU kernels: its bf16 linears (attention,
    shared expert, lm_head; moeinfer.kernels.linear.use_cpu_linears_) and its RMSNorms
    (moeinfer.kernels.norm.use_cpu_norms_), rotary embeddings (moeinfer.kernels.rope.use_cpu_rope_),
    one-token attention (moeinfer.kernels.attention.use_cpu_attention_) and one-token router logits
    (moeinfer.kernels.router.use_cpu_router_); RuntimeError when they are not built.

    fp32_weights: keep an fp32 copy of the expert weights and compute the experts in fp32. On CPUs
    without native bf16 matmul (AVX2) this is much faster for a bf16 model, at the cost of 2x the
    expert weight bytes *in addition to* the bf16 weights (3x in all). The copy is a snapshot: call
    use_kernel_ again after anything that changes the expert weights. Ignored for 'reference'.
    """
    if linears:
        use_native_dense_(model)
    stacked, others = _stacked(model), _own_stages(model)
    refused = sorted({type(s).__name__ for s in others if name != "auto" and name not in _kernels_of(s)})
    if refused:
        runs = sorted(set.intersection(*(set(_kernels_of(s)) | {"auto"} for s in others
                                         if type(s).__name__ in refused)))
        raise ValueError(f"use_kernel_: kernel {name!r} cannot run this model's MoE layers: they hold "
                         f"{', '.join(refused)}, which run their own expert stage (kernels they run: "
                         f"{', '.join(runs)})")
    if not stacked and not others:
        raise ValueError(f"use_kernel_: kernel {name!r}: the model holds no experts")
    if name not in ("auto", "reference"):
        fallback = getattr(model, "device", torch.device("cpu"))
        for stage in others:  # a kernel the stage lists must also run where the stage computes
            resolve(name, _device_of(stage, fallback))
    _set_stacked(stacked, name, fp32_weights)
    for stage in others:
        stage.kernel = type(stage).kernel if name == "auto" else name
    if hasattr(model, "moe_blocks"):
        model.kernel_choice = (name, fp32_weights)  # re-applied by compress_ / offload_
    return model


def use_native_dense_(model: nn.Module) -> nn.Module:
    """The model's dense path on the native CPU kernels, in place: its bf16 linears, RMSNorms, rotary
    embeddings, one-token attention and one-token router logits (the `linears` part of `use_kernel_`);
    RuntimeError when they are not built. Returns the model."""
    use_cpu_linears_(model)
    use_cpu_norms_(model)
    use_cpu_rope_(model)
    use_cpu_attention_(model)
    use_cpu_router_(model)
    return model


def _set_stacked(stacked: list[nn.Module], name: str, fp32_weights: bool) -> None:
    if not stacked:
        return
    spec = resolve(name, stacked[0].gate_up_proj.device)
    for experts in stacked:
        experts.kernel = spec.name
        experts.kernel_fn = None if spec.name == "reference" else spec.fn
        experts.kernel_graph_safe = spec.graph_safe and spec.name != "reference"
        experts.compute_weights = None
        if fp32_weights and spec.name != "reference" and experts.gate_up_proj.dtype != torch.float32:
            experts.compute_weights = (experts.gate_up_proj.detach().float(), experts.down_proj.detach().float())


def _device_of(stage: nn.Module, fallback: torch.device) -> torch.device:
    """Where the stage computes: its weights' device, else the model's (offloaded stages hold none)."""
    tensor = next(iter(stage.parameters()), None)
    if tensor is None:
        tensor = next(iter(stage.buffers()), None)
    return tensor.device if tensor is not None else fallback


def _kernels_of(stage: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(stage, "kernels", None) or ("reference",))


def reapply_kernel_(model: nn.Module) -> nn.Module:
    """After experts modules were swapped (compress_, offload_): give them the kernel `use_kernel_`
    chose before, where they can run it (the others keep their own default, logged)."""
    choice = getattr(model, "kernel_choice", None)
    if choice is None:
        return model
    name, fp32_weights = choice
    for stage in _own_stages(model):
        if name in _kernels_of(stage):
            stage.kernel = name
        else:
            if name != "auto":
                log.info("kernel %r: %s runs its own expert stage; it keeps its default kernel",
                         name, type(stage).__name__)
            stage.kernel = type(stage).kernel
    _set_stacked(_stacked(model), name, fp32_weights)
    return model


def kernel_names(model: nn.Module) -> set[str]:
    """The kernels the model's MoE blocks use now."""
    return {m.kernel for m in model.modules() if hasattr(m, "kernel_fn")}
