"""The `triton` kernel entry: registers the fused MoE (moeinfer/kernels/fused_moe.py) without
importing triton until it is first called.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from moeinfer.kernels.registry import register_kernel


def triton_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the optional package 'triton' is not installed (pip install 'moeinfer[kernels]')"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None  # Triton's CPU interpreter: slow, for tests only
    return (f"Triton kernels run on CUDA devices (got {device.type}); set TRITON_INTERPRET=1 before "
            "starting Python to run them in Triton's CPU interpreter")


@register_kernel("triton", why_unavailable=triton_unavailable, graph_safe=True)
def triton_moe(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
               gate_up: torch.Tensor, down: torch.Tensor, *,
               expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """Fused Triton MoE: block-aligned grouped GEMMs, SiLU*up fused, weighted atomic combine."""
    # Imported here: fused_moe imports triton, an optional dependency.
    from moeinfer.kernels.fused_moe import fused_moe

    return fused_moe(x, indices, weights, gate_up, down, expert_map=expert_map)
