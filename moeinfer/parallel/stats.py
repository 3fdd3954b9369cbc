"""Expert-parallel statistics, per rank and per MoE layer.

Each rank counts, per layer: token-units it dispatched and received (one unit = one token sent to
one rank), expert token-slots it computed (its load), bytes sent to and received from *other* ranks
in both all-to-alls (activations + routing metadata), bytes of the all-gather of replicated mode,
and seconds spent waiting on communication vs computing experts. `gather_stats` collects all ranks'
counters on every rank and derives imbalance = max / mean load over ranks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch.distributed as dist


@dataclass
class LayerStats:
    calls: int = 0
    tokens: int = 0  # tokens this rank dispatched (its shard)
    units_sent: int = 0  # (token, destination rank) pairs, including itself
    units_received: int = 0
    slots_computed: int = 0  # (token, local expert) pairs computed here: the load
    bytes_sent: int = 0  # to other ranks, dispatch + combine
    bytes_received: int = 0
    bytes_gathered: int = 0  # all-gather of replicated mode (received from others)
    comm_s: float = 0.0  # waiting on all-to-alls and the all-gather
    compute_s: float = 0.0  # expert compute

    def add(self, other: LayerStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class RankStats:
    rank: int = 0
    layers: dict[int, LayerStats] = field(default_factory=dict)

    def layer(self, layer: int) -> LayerStats:
        return self.layers.setdefault(layer, LayerStats())

    def reset(self) -> None:
        self.layers.clear()

    def total(self) -> LayerStats:
        out = LayerStats()
        for s in self.layers.values():
            out.add(s)
        return out


def gather_stats(stats: RankStats, group: dist.ProcessGroup | None = None) -> list[RankStats]:
    """Every rank's counters, on every rank (a collective: all ranks must call it)."""
    if not dist.is_initialized():
        return [stats]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, {"rank": stats.rank, "layers": {k: asdict(v) for k, v in stats.layers.items()}},
                           group=group)
    return [RankStats(o["rank"], {int(k): LayerStats(**v) for k, v in o["layers"].items()}) for o in out]


def summarize(all_ranks: list[RankStats]) -> dict[str, Any]:
    """Per layer and overall: loads per rank, imbalance (max/mean), bytes, comm vs compute seconds."""
    layers = sorted({layer for r in all_ranks for layer in r.layers})
    rows = []
    for layer in layers:
        per = [r.layers.get(layer, LayerStats()) for r in all_ranks]
        loads = [s.slots_computed for s in per]
        mean = sum(loads) / len(loads)
        rows.append({"layer": layer, "load": loads, "imbalance": max(loads) / mean if mean else 1.0,
                     "bytes_sent": sum(s.bytes_sent for s in per),
                     "bytes_gathered": sum(s.bytes_gathered for s in per),
                     "units_sent": sum(s.units_sent for s in per),
                     "comm_s": [round(s.comm_s, 6) for s in per], "compute_s": [round(s.compute_s, 6) for s in per]})
    totals = [r.total() for r in all_ranks]
    loads = [t.slots_computed for t in totals]
    mean = sum(loads) / len(loads) if loads else 0
    return {"ranks": len(all_ranks), "layers": rows,
            "per_rank": [dict(rank=r.rank, **asdict(t)) for r, t in zip(all_ranks, totals)],
            "imbalance_total": max(loads) / mean if mean else 1.0,
            "imbalance_mean_layer": sum(r["imbalance"] for r in rows) / len(rows) if rows else 1.0,
            "bytes_sent": sum(t.bytes_sent for t in totals)}


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table: one line per rank, then imbalance and bytes."""
    lines = ["rank  tokens  units_sent  slots  MiB_sent  MiB_recv  comm_s  compute_s"]
    for r in summary["per_rank"]:
        lines.append(f"{r['rank']:>4}  {r['tokens']:>6}  {r['units_sent']:>10}  {r['slots_computed']:>5}  "
                     f"{r['bytes_sent'] / 2**20:>8.3f}  {r['bytes_received'] / 2**20:>8.3f}  "
                     f"{r['comm_s']:>6.3f}  {r['compute_s']:>9.3f}")
    lines.append(f"imbalance (max/mean load): {summary['imbalance_total']:.3f} over all layers, "
                 f"{summary['imbalance_mean_layer']:.3f} mean per layer; "
                 f"all-to-all bytes: {summary['bytes_sent'] / 2**20:.3f} MiB")
    return "\n".join(lines)
