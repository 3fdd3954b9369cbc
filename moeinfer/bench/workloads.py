"""Named, versioned benchmark workloads and the exact prompts they send.

Shapes: R requests, P prompt tokens, O output tokens per request.

The workloads are data (workloads.yaml beside this file, reached by name through WORKLOADS); a user
can register more with `register_workload`. Making a workload concrete for one run follows:
1. start from the named workload (its version is recorded with every result);
2. apply the device's override (e.g. long-prefill's 1024-token prompt on CPU), then the sweep's
   per-workload overrides, then the global `scale` (tests and quick runs), noting each change;
3. cap prompt + output at the model's context, shrinking both in proportion, and note it;
4. cut R prompts of exactly P tokens from a held-out text (or the user's file) at offsets drawn
   from `seed`, and, for Poisson arrivals, draw the arrival times from the same seed.
Two runs with the same workload, model tokenizer, source and seed therefore send the same tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from moeinfer.eval import load_dataset

WORKLOADS_FILE = Path(__file__).parent / "workloads.yaml"
KINDS = ("sequential", "engine")
ARRIVALS = ("burst", "poisson")
_OVERRIDABLE = ("prompt_tokens", "output_tokens", "num_requests", "batch_size", "rate")
SOURCE_BYTES = 400_000  # prompts are cut from the first bytes of the source text


@dataclass(frozen=True)
class Workload:
    """One named workload. Lengths are tokens; `rate` is requests per second (Poisson arrivals)."""

    name: str
    version: int
    description: str
    kind: str
    prompt_tokens: int
    output_tokens: int
    num_requests: int
    batch_size: int
    arrival: str = "burst"
    rate: float | None = None
    device_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"workload {self.name!r}"
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"{where}: arrival must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}")
        if self.arrival == "poisson" and (self.kind != "engine" or not self.rate or self.rate <= 0):
            raise ValueError(f"{where}: Poisson arrivals need kind: engine and a rate > 0 (requests/s)")
        for f in ("version", "prompt_tokens", "output_tokens", "num_requests", "batch_size"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"{where}: {f} must be an integer >= 1, got {getattr(self, f)!r}")
        for device, over in self.device_overrides.items():
            bad = sorted(set(over) - set(_OVERRIDABLE))
            if bad:
                raise ValueError(f"{where}: device_overrides.{device} sets {bad}; allowed: {', '.join(_OVERRIDABLE)}")


@dataclass(frozen=True)
class ResolvedWorkload:
    """A workload made concrete for one model and device: the lengths that actually ran."""

    name: str
    version: int
    kind: str
    arrival: str
    prompt_tokens: int
    output_tokens: int
    num_requests: int
    batch_size: int
    rate: float | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["notes"] = list(self.notes)
        return d


def _parse(name: str, spec: dict[str, Any], source: str) -> Workload:
    if not isinstance(spec, dict):
        raise ValueError(f"{source}: workload {name!r} must be a mapping, got {type(spec).__name__}")
    known = {f.name for f in dataclasses.fields(Workload)} - {"name"}
    bad = sorted(set(spec) - known)
    if bad:
        raise ValueError(f"{source}: workload {name!r} has unknown fields {bad}; known: {', '.join(sorted(known))}")
    return Workload(name=name, **spec)


def load_workloads(path: str | Path = WORKLOADS_FILE) -> dict[str, Workload]:
    """Read a workloads file ({workloads: {name: fields}}) into Workload objects."""
    import yaml

    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("workloads"), dict):
        raise ValueError(f"{path}: expected a mapping with a 'workloads' mapping at the top")
    return {name: _parse(name, spec, str(path)) for name, spec in data["workloads"].items()}


_EXTRA: dict[str, Workload] = {}


@lru_cache(maxsize=1)
def _shipped() -> dict[str, Workload]:
    return load_workloads()


def workloads() -> dict[str, Workload]:
    """Every workload by name: the shipped ones, then those registered with `register_workload`."""
    return {**_shipped(), **_EXTRA}


def register_workload(w: Workload) -> Workload:
    """Add (or replace) a workload in the registry; returns it."""
    _EXTRA[w.name] = w
    return w


def get_workload(name: str) -> Workload:
    table = workloads()
    if name not in table:
        raise ValueError(f"unknown workload {name!r}; available: {', '.join(table)}")
    return table[name]


def resolve(w: Workload, *, device_type: str, context: int, scale: float = 1.0,
            overrides: dict[str, Any] | None = None, batch_size: int | None = None,
            rate: float | None = None) -> ResolvedWorkload:
    """Concrete lengths for one run (steps 2-3 of the module docstring)."""
    notes: list[str] = []
    v = {k: getattr(w, k) for k in _OVERRIDABLE}
    # 2. Device override, sweep overrides, batch-size axis, scale.
    if device_type in w.device_overrides:
        over = w.device_overrides[device_type]
        v.update(over)
        notes.append(f"scaled down on {device_type}: " + ", ".join(f"{k}={x}" for k, x in over.items())
                     + " (" + ", ".join(f"{k} {getattr(w, k)}" for k in over) + " at full size)")
    for k, x in (overrides or {}).items():
        if k not in _OVERRIDABLE:
            raise ValueError(f"workload_overrides.{w.name}.{k} is not overridable; allowed: {', '.join(_OVERRIDABLE)}")
        v[k] = x
        notes.append(f"{k}={x} set by the sweep")
    if batch_size is not None:
        v["batch_size"] = batch_size
    if rate is not None and w.arrival == "poisson":
        v["rate"] = rate
        notes.append(f"rate={rate:g} req/s set by the sweep's rate axis")
    if scale != 1.0:
        for k in ("prompt_tokens", "output_tokens"):  # >= 2 output tokens keep TPOT defined
            v[k] = max(2, round(v[k] * scale))
        v["num_requests"] = max(1, round(v["num_requests"] * scale))
        v["batch_size"] = max(1, min(v["batch_size"], v["num_requests"]))
        notes.append(f"scale={scale:g} applied to prompt/output tokens and request count")
    # 3. Context cap.
    p, o = int(v["prompt_tokens"]), int(v["output_tokens"])
    if p + o > context:
        f = context / (p + o)
        p2 = max(1, int(p * f))
        o2 = max(1, context - p2)
        notes.append(f"capped by the model's context of {context} tokens: {p}+{o} -> {p2}+{o2}")
        p, o = p2, o2
    return ResolvedWorkload(name=w.name, version=w.version, kind=w.kind, arrival=w.arrival, prompt_tokens=p,
                            output_tokens=o, num_requests=int(v["num_requests"]), batch_size=int(v["batch_size"]),
                            rate=float(v["rate"]) if v["rate"] is not None else None, notes=tuple(notes))


def source_token_ids(tokenizer: Any, source: str) -> list[int]:
    """Token ids of a held-out text ("english", "python") or a user's file, first SOURCE_BYTES bytes."""
    text = load_dataset(source).text
    text = text.encode("utf-8")[:SOURCE_BYTES].decode("utf-8", errors="ignore")
    return list(tokenizer.encode(text))


def build_prompts(w: ResolvedWorkload, ids: list[int], *, seed: int) -> list[list[int]]:
    """R prompts of exactly P tokens cut from `ids` at offsets drawn from `seed` (step 4)."""
    P = w.prompt_tokens
    if len(ids) < P + 1:
        raise ValueError(f"workload {w.name}: the prompt source has {len(ids)} tokens, fewer than the "
                         f"{P} one prompt needs")
    rng = np.random.default_rng([seed, w.version, sum(map(ord, w.name))])
    starts = rng.integers(0, len(ids) - P, size=w.num_requests)
    return [ids[s:s + P] for s in starts.tolist()]


def arrival_times(w: ResolvedWorkload, *, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: 0 for bursts, Poisson for `rate`."""
    if w.arrival == "burst":
        return [0.0] * w.num_requests
    rng = np.random.default_rng([seed, w.version, 7])
    assert w.rate is not None
    gaps = rng.exponential(1.0 / w.rate, size=w.num_requests)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()
