"""Kernel registry for the MoE block's expert stage (dispatch -> expert compute -> combine).

Shapes: N tokens, D hidden, E experts (rows present locally), K top-k, I expert inner size.

A kernel is a function

    kernel(x [N, D], indices [N, K], weights [N, K], gate_up [E, 2I, D], down [E, D, I],
           *, expert_map [E_global] | None) -> out [N, D]

that returns sum_k weights[n, k] * expert_{indices[n, k]}(x[n]), the same as the eager stages in
moeinfer/model/moe.py. `expert_map` maps a global expert id to its local row in gate_up/down, -1
when the expert is not held here (offloading, expert parallelism): such slots contribute nothing.

Registries are a dict plus a decorator (as in megablocks and HF transformers' experts
implementations); a bad name lists the valid ones, an unavailable backend says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


class MoEKernel(Protocol):
    def __call__(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                 gate_up: torch.Tensor, down: torch.Tensor, *,
                 expert_map: torch.Tensor | None = None) -> torch.Tensor: ...


class KernelUnavailableError(ValueError):
    """The chosen kernel cannot run here (missing package, wrong device)."""


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: MoEKernel
    why_unavailable: Callable[[torch.device], str | None]  # None = usable on this device
    graph_safe: bool  # no host synchronisation: can be captured in a CUDA graph
    doc: str


KERNELS: dict[str, KernelSpec] = {}
CHOICES = ("auto", "reference", "cpu", "triton")


def _always(device: torch.device) -> str | None:
    return None


def register_kernel(name: str, *, why_unavailable: Callable[[torch.device], str | None] = _always,
                    graph_safe: bool = False) -> Callable[[MoEKernel], MoEKernel]:
    """Decorator: register `fn` under `name`."""

    def wrap(fn: MoEKernel) -> MoEKernel:
        if name in KERNELS:
            raise ValueError(f"MoE kernel {name!r} is already registered")
        KERNELS[name] = KernelSpec(name, fn, why_unavailable, graph_safe, (fn.__doc__ or "").strip())
        return fn

    return wrap


def _load_backends() -> None:
    # Imported here: the backend modules register themselves here when imported (circular at module level);
    # none imports triton at module level.
    from moeinfer.kernels import cpu, reference, triton_backend  # noqa: F401


def resolve(name: str, device: torch.device | str) -> KernelSpec:
    """The kernel called `name` for `device` ('auto' picks the best usable one).

    Raises ValueError for an unknown name (listing the valid ones) and KernelUnavailableError
    when the backend cannot run on `device`, saying why.
    """
    _load_backends()
    device = torch.device(device)
    if name == "auto":
        order = ("triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        for candidate in order:
            if KERNELS[candidate].why_unavailable(device) is None:
                return KERNELS[candidate]
        return KERNELS["reference"]
    if name not in KERNELS:
        raise ValueError(f"unknown MoE kernel {name!r}; valid: {', '.join(['auto', *sorted(KERNELS)])}")
    spec = KERNELS[name]
    why = spec.why_unavailable(device)
    if why is not None:
        raise KernelUnavailableError(f"MoE kernel {name!r} is unavailable on {device}: {why}")
    return spec


def get_kernel(name: str, device: torch.device | str = "cpu") -> MoEKernel:
    return resolve(name, device).fn
