"""Routing profiles: which experts tokens chose, per MoE layer, as input to placement and simulation.

Shapes: T tokens, L MoE layers, K top-k, E experts.

A `RoutingProfile` holds either token-level choices `indices [T, L, K]` (a trace) or only the
expected load `load [L, E]` (tokens per expert). Readers:
- moeinfer's own routing traces (.npz, `moeinfer.traces.trace.RoutingTrace`); -1 marks an unused slot;
- the third-party Mixtral-8x7B jsonl traces (one line per token and layer with "experts"), through
  `moeinfer.traces.convert` when present;
- a profile JSON written by `RoutingProfile.save` ({"num_experts", "layers", "load"} and optional
  "indices").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeinfer.traces.convert import convert_mixtral
from moeinfer.traces.trace import RoutingTrace


class ProfileError(ValueError):
    """A routing profile or trace file cannot be read."""


@dataclass
class RoutingProfile:
    num_experts: int
    layers: list[int]  # model layer index of each MoE layer (row of load / column of indices)
    indices: torch.Tensor | None = None  # [T, L, K] int64 expert chosen by token t in layer l (-1: none)
    counts: torch.Tensor | None = None  # [L, E] float tokens per expert, when no indices are known
    source: str = ""

    def __post_init__(self) -> None:
        if self.indices is None and self.counts is None:
            raise ProfileError(f"{self.source or 'routing profile'}: needs token choices or per-expert loads")
        if self.indices is not None:
            if self.indices.dim() != 3 or self.indices.shape[1] != len(self.layers):
                raise ProfileError(f"{self.source}: indices must be [T, L={len(self.layers)}, K], "
                                   f"got {tuple(self.indices.shape)}")
            if self.indices.numel() and not -1 <= int(self.indices.min()) <= int(self.indices.max()) < self.num_experts:
                raise ProfileError(f"{self.source}: expert ids outside 0..{self.num_experts - 1} (-1: unused slot)")

    @property
    def num_tokens(self) -> int:
        return 0 if self.indices is None else self.indices.shape[0]

    @property
    def top_k(self) -> int:
        return 0 if self.indices is None else self.indices.shape[2]

    def load(self) -> torch.Tensor:
        """[L, E] token-slots per expert."""
        if self.counts is not None:
            return self.counts.float()
        assert self.indices is not None
        L = len(self.layers)
        flat = self.indices.permute(1, 0, 2).reshape(L, -1)
        return torch.stack([torch.bincount(flat[i][flat[i] >= 0], minlength=self.num_experts)
                            for i in range(L)]).float()

    def select(self, tokens: slice | torch.Tensor) -> RoutingProfile:
        assert self.indices is not None, "select needs token-level indices"
        return RoutingProfile(self.num_experts, list(self.layers), self.indices[tokens], source=self.source)

    def save(self, path: str | os.PathLike[str]) -> None:
        data: dict[str, Any] = {"num_experts": self.num_experts, "layers": self.layers,
                                "load": self.load().tolist()}
        if self.indices is not None:
            data["indices"] = self.indices.tolist()
        Path(path).write_text(json.dumps(data))


def _is_mixtral_jsonl(path: Path) -> bool:
    with open(path) as f:
        first = f.readline()
    try:
        rec = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(rec, dict) and "experts" in rec and "layer" in rec and "token_idx" in rec


def read_profile(path: str | os.PathLike[str], *, num_experts: int | None = None) -> RoutingProfile:
    """Read a routing trace or profile: a moeinfer trace (.npz), Mixtral routing jsonl (a file or a
    folder of them), or a profile .json written by RoutingProfile.save."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*routing*.jsonl")) or sorted(path.glob("*.jsonl"))
        if not files:
            raise ProfileError(f"{path} holds no *.jsonl routing traces")
        return _mixtral(files, num_experts)
    if not path.is_file():
        raise ProfileError(f"routing trace/profile {path} does not exist")
    if path.suffix == ".jsonl" and _is_mixtral_jsonl(path):
        return _mixtral([path], num_experts)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ProfileError(f"{path} is not valid JSON: {e}") from e
        if not (isinstance(data, dict) and "load" in data):
            raise ProfileError(f"{path}: a profile .json needs 'num_experts', 'layers' and 'load'")
        idx = torch.tensor(data["indices"], dtype=torch.long) if data.get("indices") else None
        return RoutingProfile(int(data["num_experts"]), [int(v) for v in data["layers"]], idx,
                              None if idx is not None else torch.tensor(data["load"], dtype=torch.float),
                              source=str(path))
    if path.suffix == ".npz":
        return from_trace(RoutingTrace.load(path), source=str(path))
    raise ProfileError(f"{path}: not a routing trace (.npz), Mixtral routing .jsonl or profile .json")


def from_trace(trace: Any, *, source: str = "") -> RoutingProfile:
    """A moeinfer RoutingTrace (moeinfer.traces.trace) -> RoutingProfile (-1 slots stay -1)."""
    return RoutingProfile(int(trace.num_experts), [int(v) for v in trace.layers],
                          torch.from_numpy(trace.experts.astype("int64")), source=source)


def _mixtral(files: list[Path], num_experts: int | None) -> RoutingProfile:
    """Through the trace converter (moeinfer.traces.convert checks every field)."""
    return from_trace(convert_mixtral(files, num_experts=num_experts or 8),
                      source=", ".join(p.name for p in files))
