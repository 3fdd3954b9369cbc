"""Mapping between checkpoint tensor names and moeinfer's parameters.

Checkpoints store one tensor per expert projection (`...experts.{e}.w1.weight`); moeinfer stacks
them: `experts.gate_up_proj [E, 2I, D]` (gate rows then up rows) and `experts.down_proj [E, D, I]`.
Fused checkpoints (transformers v5 internal names) map one-to-one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from moeinfer.arch import ArchSpec

_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$")


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: parameter `name`, expert row `expert`, part gate/up/down."""

    name: str
    expert: int | None = None
    part: str | None = None

    def view(self, param: torch.Tensor) -> torch.Tensor:
        if self.expert is None:
            return param
        row = param[self.expert]
        if self.part == "down":
            return row
        half = row.shape[0] // 2
        return row[:half] if self.part == "gate" else row[half:]


def to_internal(hf_name: str, spec: ArchSpec) -> Target:
    name = hf_name.removeprefix("model.")
    for theirs, ours in spec.renames:
        name = name.replace(theirs, ours)
    m = _EXPERT.match(name)
    if m:
        layer, expert, proj = int(m[1]), int(m[2]), m[3]
        gate, up, down = spec.expert_names
        part = {gate: "gate", up: "up", down: "down"}.get(proj)
        if part is not None:
            param = "down_proj" if part == "down" else "gate_up_proj"
            return Target(f"layers.{layer}.mlp.experts.{param}", expert, part)
    return Target(name)


def to_checkpoint(name: str, spec: ArchSpec) -> str:
    """moeinfer parameter name -> checkpoint name (non-expert tensors)."""
    for theirs, ours in spec.renames:
        name = name.replace(ours, theirs)
    return name if name.startswith("lm_head.") else f"model.{name}"


def expert_checkpoint_names(name: str, num_experts: int, spec: ArchSpec) -> list[tuple[str, Target]]:
    """Stacked expert parameter name -> [(checkpoint name, target slice)] for every expert."""
    prefix, param = name.rsplit(".", 1)
    parts = ("down",) if param == "down_proj" else ("gate", "up")
    gate, up, down = spec.expert_names
    proj = {"gate": gate, "up": up, "down": down}
    out = []
    for e in range(num_experts):
        for part in parts:
            ours = f"{prefix}.{e}.{proj[part]}.weight"
            out.append((to_checkpoint(ours, spec), Target(name, e, part)))
    return out
