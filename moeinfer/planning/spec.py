"""`Plan`: the configuration `moeinfer plan` chose, with what it predicts, as data (a YAML file).

A plan says, for one model, device and memory budget:
- `precisions`: each MoE layer's expert precision ("bf16" = the checkpoint's floating weights kept,
  or a quantize preset name: int8, int4, q8_0, q4_0, ...), applied by `compress_` (quantize_layers);
- `offload`: None (every expert resident) or where the experts live and how the fast-tier cache
  runs (the fields of `moeinfer.OffloadConfig`), applied by `offload_` after `compress_`: offloaded
  experts share one precision (float, or one quantize preset whose codes move between the tiers);
- `kernel` / `fp32_weights`: the expert-stage kernel, applied by `use_kernel_`;
- `batch_size`: the decode batch the predictions assume (the throughput objective chooses it);
- `predicted`: decode and prefill tokens/s, memory and quality cost from the cost and quality models
  (docs/planner.md); `runners_up`: the next best plans, each with its own prediction.
`Plan.save` writes YAML atomically; `Plan.load` reads it back equal and names the field at fault.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moeinfer.fsutil import atomic_write_text
from moeinfer.offload.config import OffloadConfig

PLAN_FORMAT = "moeinfer-plan"
PLAN_VERSION = 1
FLOAT = "bf16"  # the precision name of unquantized experts (the checkpoint's own dtype)
OBJECTIVES = ("latency", "throughput")
DEVICES = ("cpu", "cuda")


class PlanError(ValueError):
    """A plan (file or object) is malformed; the message names the file and field at fault."""


@dataclass(frozen=True)
class PlanOffload:
    """Offload settings of a plan: the fields of `moeinfer.OffloadConfig` a plan chooses."""

    tier: str = "disk"
    cache_experts: int = 8  # fast-tier expert slots (scope global: in all; scope layer: per MoE layer)
    scope: str = "global"
    policy: str = "lru"
    prefetch: str = "none"
    cpu_assist: bool = False

    def config(self, *, offload_dir: str | os.PathLike[str] | None = None, calibration: Any = None) -> Any:
        """The OffloadConfig that runs these settings (`offload_dir`: the disk tier's folder)."""
        return OffloadConfig(tier=self.tier, cache=self.cache_experts, scope=self.scope, policy=self.policy,
                             prefetch=self.prefetch, cpu_assist=self.cpu_assist, offload_dir=offload_dir,
                             calibration=calibration)

    def describe(self) -> str:
        extra = "+cpu-assist" if self.cpu_assist else ""
        return f"offload {self.tier}: {self.cache_experts} slots ({self.scope}) {self.policy}/{self.prefetch}{extra}"


@dataclass(frozen=True)
class Prediction:
    """What the models predict for a plan (docs/planner.md says how each is computed)."""

    decode_tok_s: float  # at the plan's batch size, generated tokens/s over all rows
    prefill_tok_s: float
    memory_bytes: int  # weights resident + cache slots + KV cache + working memory
    quality_loss: float | None  # predicted relative bits-per-byte increase (0.01 = 1%); None = not measured
    bits_per_byte: float | None = None  # predicted bits per byte on the calibration text
    step_ms: float = 0.0  # one decode step at the batch size
    hit_rate: float | None = None  # decode: the simulated expert cache's hit rate (None: every expert resident)
    # the most memory while `load_planned` builds it from the checkpoint (quantized experts are quantized
    # while loading, one MoE layer of float experts at a time; an offloaded plan writes each to its store);
    # reported, not held to the budget; 0 = not priced (a plan of a loaded model)
    load_peak_bytes: int = 0
    # the machine's speed on this model's shape when planned, over its profile's (speed_probe), on
    # prompts and on decode steps: prefill is simulated with its compute at the first, decode at the
    # second (loads over the link as profiled: moeinfer.planning.costs.simulate_plan; 1 = not probed)
    machine_speed: float = 1.0
    machine_decode_speed: float = 1.0


@dataclass(frozen=True)
class Plan:
    model: str
    device: str
    budget_bytes: int
    objective: str
    precisions: tuple[str, ...]
    offload: PlanOffload | None = None
    kernel: str = "auto"
    fp32_weights: bool = False
    batch_size: int = 1
    predicted: Prediction | None = None
    notes: tuple[str, ...] = ()  # what the prediction assumed (routing source, quality source, ...)
    runners_up: tuple[Plan, ...] = ()
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise PlanError(f"plan.device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.objective not in OBJECTIVES:
            raise PlanError(f"plan.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not self.precisions:
            raise PlanError("plan.precisions must list one precision per MoE layer")
        if self.offload is not None and len(set(self.precisions)) != 1:
            raise PlanError("plan: offloaded experts share one precision in every MoE layer (offload_ moves "
                            f"experts of one format); got {', '.join(sorted(set(self.precisions)))}")
        if self.batch_size < 1:
            raise PlanError(f"plan.batch_size must be >= 1, got {self.batch_size}")
        if self.budget_bytes < 1:
            raise PlanError(f"plan.budget_bytes must be > 0, got {self.budget_bytes}")

    # --- text ---
    def describe(self) -> str:
        """One line: precisions (run-length), offload, kernel, batch."""
        runs: list[str] = []
        for p in self.precisions:
            if runs and runs[-1].split("x")[-1] == p:
                n = int(runs[-1].split("x")[0]) + 1
                runs[-1] = f"{n}x{p}"
            else:
                runs.append(f"1x{p}")
        prec = "all " + self.precisions[0] if len(runs) == 1 else ",".join(runs)
        parts = [prec, self.offload.describe() if self.offload else "resident",
                 f"kernel {self.kernel}{'+fp32' if self.fp32_weights else ''}"]
        if self.batch_size != 1:
            parts.append(f"batch {self.batch_size}")
        return "; ".join(parts)

    # --- data ---
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["precisions"] = list(self.precisions)
        d["notes"] = list(self.notes)
        d["runners_up"] = [r.to_dict() for r in self.runners_up]
        return {"format": PLAN_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "plan") -> Plan:
        if not isinstance(d, dict):
            raise PlanError(f"{where}: a plan is a mapping, got {type(d).__name__}")
        d = dict(d)
        fmt = d.pop("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise PlanError(f"{where}: format is {fmt!r}, expected {PLAN_FORMAT!r}")
        version = d.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanError(f"{where}: plan version {version!r} is not supported (this moeinfer reads {PLAN_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PlanError(f"{where}: unknown field(s) {', '.join(unknown)}; fields: {', '.join(sorted(known))}")
        missing = [k for k in ("model", "device", "budget_bytes", "objective", "precisions") if k not in d]
        if missing:
            raise PlanError(f"{where}: missing field(s) {', '.join(missing)}")
        try:
            d["precisions"] = tuple(str(p) for p in d["precisions"])
            d["notes"] = tuple(str(n) for n in d.get("notes") or ())
            if d.get("offload") is not None:
                d["offload"] = _sub(PlanOffload, d["offload"], f"{where}.offload")
            if d.get("predicted") is not None:
                d["predicted"] = _sub(Prediction, d["predicted"], f"{where}.predicted")
            d["runners_up"] = tuple(cls.from_dict({"format": PLAN_FORMAT, **r}, where=f"{where}.runners_up[{i}]")
                                    for i, r in enumerate(d.get("runners_up") or ()))
            for k in ("budget_bytes", "batch_size"):
                if k in d and (isinstance(d[k], bool) or not isinstance(d[k], int)):
                    raise PlanError(f"{where}.{k} must be an integer, got {d[k]!r}")
            return cls(**d)
        except (TypeError, ValueError) as e:
            if str(e).startswith(where):
                raise
            raise PlanError(f"{where}: {e}") from e

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as YAML, atomically (temp file, then rename)."""
        import yaml

        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise PlanError(f"plan file {p} is not valid YAML: {e}") from e
        return cls.from_dict(data, where=str(p))


def _sub(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise PlanError(f"{where} must be a mapping, got {type(value).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {', '.join(unknown)}; fields: {', '.join(sorted(known))}")
    try:
        return cls(**value)
    except TypeError as e:
        raise PlanError(f"{where}: {e}") from e
