"""The dense path of a planned model (attention, norms, rotary embeddings, LM head): what `apply_plan_`
and `load_planned` run, and what the machine profile times, so the cost model prices the path that runs.

On a CPU where the native kernels are built, a planned model's dense path runs on them
(`moeinfer.kernels.use_native_dense_`, the `linears` part of `use_kernel_`: a decode token's bf16
linears as one GEMV reading each weight once, short prefills as row products, RMSNorm, rotary
embeddings and one-token attention natively), whatever expert kernel the plan names. The expert
kernel is a choice the search makes by cost; the dense path is not one: the native modules compute
the same operations as the eager ones (tested against them), and on a CPU without bf16 matmul
instructions torch's bf16 `aten::mm` is the slower one (in the profiled real-shape Mixtral run it
took 36 ms a token for attention and LM head, ~12 GB/s of weights, where the native GEMV reads ~19).
Elsewhere (CUDA, the native library not built or stale) the torch modules run, and the profile times
those.
"""

from __future__ import annotations

from typing import Any

import torch

from moeinfer.kernels import native, use_native_dense_


def native_dense(device: torch.device | str) -> bool:
    """Whether a planned model on `device` runs its dense path on the native CPU kernels."""
    return torch.device(device).type == "cpu" and native.unavailable_reason() is None


def use_planned_dense_(model: Any, device: torch.device | str | None = None) -> bool:
    """Put `model`'s dense path on the path a plan runs on `device` (default: the model's), in place;
    returns whether that is the native one (else the model is left as it is)."""
    dev = device if device is not None else getattr(model, "device", torch.device("cpu"))
    if not native_dense(dev):
        return False
    use_native_dense_(model)
    return True
