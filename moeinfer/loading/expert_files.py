"""Where each routed expert's weights lie in a checkpoint's safetensors files, for loading experts later.

Shapes: L MoE layers, E experts, D hidden, I expert inner size.

A model bigger than memory is loaded with its experts left in the checkpoint (`load_checkpoint(...,
experts_on_disk=True)`): the stacked expert parameters stay on the meta device (no storage) and the
loader records, for each expert, the byte ranges of its parts instead of reading them. The offload
store over those files (moeinfer.offload.checkpoint_store) then reads one expert at a time at those
offsets: the checkpoint itself is the disk tier, and nothing expert-sized is ever allocated in full.
A part is the expert's gate or up rows of gate_up [2I, D], its down [D, I], or, for fused checkpoints
(one [E, 2I, D] tensor per layer), a whole row of that tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeinfer.loading.errors import CheckpointError

PARTS = ("gate", "up", "down", "gate_up")


@dataclass(frozen=True)
class ExpertPart:
    """One byte range of a checkpoint file holding part of an expert (module docstring)."""

    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype  # as stored (converted to the model's dtype on read)
    part: str  # gate, up, down or gate_up


@dataclass
class ExpertFiles:
    """Every expert's parts, keyed by (MoE layer position, expert); `dtype` is the model's."""

    root: Path
    num_layers: int
    num_experts: int
    gate_up_shape: tuple[int, int]  # [2I, D]
    down_shape: tuple[int, int]  # [D, I]
    dtype: torch.dtype
    parts: dict[tuple[int, int], list[ExpertPart]] = field(default_factory=dict)

    def add(self, key: tuple[int, int], part: ExpertPart) -> None:
        self.parts.setdefault(key, []).append(part)

    def check_complete(self) -> None:
        """Every expert of every layer has its gate and up (or gate_up) and its down part."""
        for layer in range(self.num_layers):
            for e in range(self.num_experts):
                have = {p.part for p in self.parts.get((layer, e), [])}
                if "down" not in have or not ({"gate", "up"} <= have or "gate_up" in have):
                    raise CheckpointError(f"checkpoint {self.root}: MoE layer {layer} expert {e} is incomplete "
                                          f"(found parts {sorted(have) or 'none'})")

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert in the model's dtype (what a fast-tier slot holds)."""
        (a, b), (c, d) = self.gate_up_shape, self.down_shape
        return (a * b + c * d) * torch.empty((), dtype=self.dtype).element_size()


def memory_available(device: torch.device | str) -> int:
    """Bytes free now on `device`: MemAvailable on the CPU, free GPU memory on CUDA."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
