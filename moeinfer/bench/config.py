"""Sweep configuration of `moeinfer bench`: models, and the options swept as axes.

Each axis value names a transform `apply(model, value) -> None` applied in place to the freshly loaded
model (compression, then kernel, routing, offload); an unknown value is rejected with what exists.
Values resolve through moeinfer's own registries, and `register_*` adds custom ones:

    kernel       reference, cpu, triton, auto   (moeinfer.kernels)
    compression  none, a named recipe (int8, int4, int2, mixed-2.5, prune-25, merge-25, lowrank-50,
                 sparse-50, dense, ...: moeinfer.compress.presets), or a recipe YAML file
    routing      default, top-k:K, top-p:P, threshold:T, entropy:H (dynamic gating, moeinfer.model.gating)
    offload      none, or POLICY:CACHE[:PREFETCH[:cpu-assist]] e.g. lru:8, belady:16, lfu:8:next-layer
                 (experts on disk in a temporary folder, CACHE experts or bytes in RAM: moeinfer.offload)
    dtype        null (checkpoint's), float32, bfloat16, float16
    batch_size   null (the workload's), or an integer
    rate         null (the workload's), or requests/s for Poisson-arrival workloads (a rate sweep
                 traces the throughput-latency curve; other workloads ignore it and run once)
    workload     any name in moeinfer/bench/workloads.yaml

A sweep file (YAML or JSON) looks like moeinfer/bench/suites/default.yaml; `mode: product` runs the
cross product of the axes, `mode: list` runs the `points` listed (each a partial set of axes, the
rest taken from the first value of each axis).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeinfer.bench.latency import SLO
from moeinfer.bench.workloads import get_workload
from moeinfer.compress.api import compress_
from moeinfer.compress.presets import PRESETS
from moeinfer.fsutil import scratch_dir
from moeinfer.kernels import CHOICES, use_kernel_
from moeinfer.model.gating import parse_mode, set_routing_
from moeinfer.offload.apply import offload_
from moeinfer.offload.config import SPEC_FORMAT, OffloadConfig, parse_offload_spec

SUITES_DIR = Path(__file__).parent / "suites"
Transform = Callable[[Any, str], None]
KERNELS: dict[str, Transform] = {}
COMPRESSION: dict[str, Transform] = {}
ROUTING: dict[str, Transform] = {}  # custom routing modes, keyed by prefix ("mine" handles "mine:3")
OFFLOAD: dict[str, Transform] = {}
DTYPES = (None, "float32", "bfloat16", "float16")
AXES = ("model", "workload", "kernel", "compression", "routing", "offload", "dtype", "batch_size", "rate")


def _register(table: dict[str, Transform], key: str) -> Callable[[Transform], Transform]:
    def deco(fn: Transform) -> Transform:
        table[key] = fn
        return fn
    return deco


def register_kernel(name: str) -> Callable[[Transform], Transform]:
    return _register(KERNELS, name)


def register_compression(name: str) -> Callable[[Transform], Transform]:
    return _register(COMPRESSION, name)


def register_routing(prefix: str) -> Callable[[Transform], Transform]:
    return _register(ROUTING, prefix)


def register_offload(name: str) -> Callable[[Transform], Transform]:
    return _register(OFFLOAD, name)


def _kernel(model: Any, value: str) -> None:
    use_kernel_(model, value)


def _compression(model: Any, value: str) -> None:
    compress_(model, value, progress=False)


def _routing(model: Any, value: str) -> None:
    set_routing_(model, value)


def parse_offload(value: str) -> OffloadConfig:
    """'lru:8' / 'lfu:512MB:next_layer' / 'lru:8:none:cpu-assist' -> OffloadConfig (disk tier, temp dir)."""
    parse_offload_spec(value, tier="cpu")  # validated before a folder is made
    return parse_offload_spec(value, tier="disk", offload_dir=scratch_dir("moeinfer-bench-experts-"),
                              remove_offload_dir=True)


def _offload(model: Any, value: str) -> None:
    offload_(model, parse_offload(value), progress=False)


def _transform(axis: str, value: str) -> Transform:
    """The transform of one axis value: a registered custom one, else moeinfer's own."""
    if value in ("none", "default", "reference"):  # a freshly loaded model is all of these
        return lambda model, value: None
    custom = {"kernel": KERNELS, "compression": COMPRESSION, "offload": OFFLOAD}.get(axis)
    if custom is not None and value in custom:
        return custom[axis]
    if axis == "routing" and str(value).partition(":")[0] in ROUTING:
        return ROUTING[str(value).partition(":")[0]]
    return {"kernel": _kernel, "compression": _compression, "routing": _routing, "offload": _offload}[axis]


def _check_value(axis: str, value: Any, where: str) -> None:
    if axis in ("kernel", "compression", "routing", "offload"):
        if not isinstance(value, str):
            raise ValueError(f"{where}: {axis} must be a string, got {value!r}")
        try:
            _validate(axis, value)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if axis == "dtype" and value not in DTYPES:
        raise ValueError(f"{where}: unknown dtype {value!r}; available: null (the checkpoint's), "
                         f"{', '.join(d for d in DTYPES if d)}")
    if axis == "batch_size" and value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{where}: batch_size must be null or an integer >= 1, got {value!r}")
    if axis == "rate" and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                 or value <= 0):
        raise ValueError(f"{where}: rate must be null or a number > 0 (requests/s), got {value!r}")
    if axis == "workload":
        try:
            get_workload(value)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def _validate(axis: str, value: str) -> None:
    """Reject an unknown axis value before anything runs, naming what exists."""
    custom = {"kernel": KERNELS, "compression": COMPRESSION, "offload": OFFLOAD}.get(axis, {})
    if value in custom or value in ("none", "default") and axis != "kernel":
        return
    if axis == "kernel":
        if value not in CHOICES:
            raise ValueError(f"unknown kernel {value!r}; available: {', '.join(CHOICES)}")
    elif axis == "compression":
        if value not in PRESETS and not Path(value).is_file():
            raise ValueError(f"unknown compression {value!r}; available: none, {', '.join(PRESETS)}, "
                             f"or a recipe YAML file")
    elif axis == "routing":
        if value.partition(":")[0] in ROUTING:
            return

        try:
            parse_mode(value)
        except ValueError as e:
            raise ValueError(f"unknown routing mode {value!r}: {e}") from None
    elif axis == "offload":
        try:
            parse_offload_spec(value, tier="cpu")
        except ValueError as e:
            raise ValueError(f"unknown offload {value!r}; expected none or {SPEC_FORMAT}: {e}") from None


def apply_axes(model: Any, point: Point) -> None:
    """Transform a freshly loaded model for one point: compression, kernel, routing, offload (in place)."""
    for axis in ("compression", "kernel", "routing", "offload"):
        value = getattr(point, axis)
        _transform(axis, value)(model, value)


@dataclass(frozen=True)
class Point:
    """One configuration of the sweep."""

    model: str
    workload: str
    kernel: str = "reference"
    compression: str = "none"
    routing: str = "default"
    offload: str = "none"
    dtype: str | None = None
    batch_size: int | None = None
    rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def id(self) -> str:
        """Stable, readable identifier (used by --resume and compare)."""
        parts = [Path(self.model).name or self.model, self.workload, self.kernel, self.compression, self.routing,
                 self.offload, self.dtype or "ckpt-dtype", f"b{self.batch_size}" if self.batch_size else "b-default"]
        if self.rate is not None:
            parts.append(f"r{self.rate:g}")
        return "/".join(parts)

    @property
    def model_key(self) -> tuple[Any, ...]:
        """Points sharing this key reuse one loaded, transformed model (and its quality numbers)."""
        return (self.model, self.dtype, self.kernel, self.compression, self.routing, self.offload)


@dataclass
class QualityConfig:
    datasets: list[str] = field(default_factory=lambda: ["english", "python"])
    max_bytes: int = 20_000

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"quality.max_bytes must be >= 1, got {self.max_bytes}")


@dataclass
class EnergyConfig:
    min_window_s: float = 1.0  # shorter measurement windows are reported as not measurable
    idle_s: float = 1.0  # idle power is measured over this window before the sweep

    def __post_init__(self) -> None:
        if self.min_window_s < 0 or self.idle_s < 0:
            raise ValueError("energy.min_window_s and energy.idle_s must be >= 0")


@dataclass
class SweepConfig:
    """A whole sweep; `source` names the file it came from (for error messages)."""

    name: str = "custom"
    models: list[str] = field(default_factory=lambda: ["tiny"])
    device: str = "cpu"
    axes: dict[str, list[Any]] = field(default_factory=dict)
    mode: str = "product"
    points: list[dict[str, Any]] = field(default_factory=list)
    scale: float = 1.0
    seed: int = 0
    prompt_source: str = "english"
    workload_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    slo: dict[str, float] = field(default_factory=lambda: {"ttft_s": 2.0, "tpot_s": 0.2})
    quality: QualityConfig = field(default_factory=QualityConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    peaks: bool = True  # measure copy bandwidth and matmul peaks
    source: str = "<config>"

    def __post_init__(self) -> None:
        if isinstance(self.quality, dict):
            self.quality = QualityConfig(**self.quality)
        if isinstance(self.energy, dict):
            self.energy = EnergyConfig(**self.energy)
        src = self.source
        if self.mode not in ("product", "list"):
            raise ValueError(f"{src}: mode must be 'product' or 'list', got {self.mode!r}")
        if not self.models:
            raise ValueError(f"{src}: models must name at least one model")
        if not 0 < self.scale <= 10:
            raise ValueError(f"{src}: scale must be in (0, 10], got {self.scale}")
        bad = sorted((set(self.axes) - set(AXES)) | ({"model"} & set(self.axes)))
        if bad:
            raise ValueError(f"{src}: unknown axes {bad}; axes: {', '.join(a for a in AXES if a != 'model')} "
                             f"(models are listed under 'models')")
        for axis, values in self.axes.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{src}: axes.{axis} must be a non-empty list")
            for v in values:
                _check_value(axis, v, f"{src}: axes.{axis}")
        if "workload" not in self.axes and self.mode == "product":
            raise ValueError(f"{src}: axes.workload must list at least one workload")
        for i, p in enumerate(self.points):
            bad = sorted(set(p) - set(AXES))
            if bad:
                raise ValueError(f"{src}: points[{i}] has unknown keys {bad}; keys: {', '.join(AXES)}")
            for axis, v in p.items():
                if axis != "model":
                    _check_value(axis, v, f"{src}: points[{i}].{axis}")
        if self.mode == "list" and not self.points:
            raise ValueError(f"{src}: mode: list needs a non-empty 'points' list")
        SLO(**self.slo)

    @property
    def slo_obj(self) -> SLO:
        return SLO(**self.slo)

    def expand(self) -> list[Point]:
        """The points to run, in order (cross product, or the listed combinations)."""
        values = {"model": self.models, **{a: self.axes.get(a) for a in AXES if a != "model"}}
        defaults = {a: v[0] for a, v in values.items() if v}
        if self.mode == "list":
            points = _without_rate_repeats([Point(**{**defaults, **p}) for p in self.points])
            keys = list(dict.fromkeys(p.model_key for p in points))
            return sorted(points, key=lambda p: keys.index(p.model_key))  # stable: listed order within a model
        # Axes that change the model vary slowest, so each model is loaded (and evaluated) once.
        order = ("model", "dtype", "kernel", "compression", "routing", "offload", "workload", "batch_size", "rate")
        names = [a for a in order if values.get(a)]
        points = [Point(**dict(zip(names, combo))) for combo in itertools.product(*(values[a] for a in names))]
        return _without_rate_repeats(points)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def digest(self) -> str:
        """Hash of the settings that change what a point measures (not the axes themselves)."""
        skip = ("name", "models", "axes", "mode", "points", "peaks")
        d = {k: v for k, v in self.to_dict().items() if k not in skip}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _without_rate_repeats(points: list[Point]) -> list[Point]:
    """A rate only matters to Poisson-arrival workloads: drop it elsewhere, and the repeats it made."""
    out = [p if p.rate is None or get_workload(p.workload).arrival == "poisson" else dataclasses.replace(p, rate=None)
           for p in points]
    return list(dict.fromkeys(out))


def load_sweep(path: str | Path) -> SweepConfig:
    """A sweep from a YAML/JSON file, or a shipped suite by name (moeinfer/bench/suites/NAME.yaml)."""
    p = Path(path)
    if not p.exists() and (SUITES_DIR / f"{path}.yaml").exists():
        p = SUITES_DIR / f"{path}.yaml"
    if not p.exists():
        suites = ", ".join(sorted(s.stem for s in SUITES_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"sweep config {str(path)!r} is neither a file nor a shipped suite ({suites})")
    import yaml

    try:
        data = yaml.safe_load(p.read_text())  # YAML is a superset of JSON: one parser for both
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML/JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a sweep config must be a mapping")
    known = {f.name for f in dataclasses.fields(SweepConfig)} - {"source"}
    bad = sorted(set(data) - known)
    if bad:
        raise ValueError(f"{p}: unknown fields {bad}; known: {', '.join(sorted(known))}")
    try:
        return SweepConfig(**data, source=str(p))
    except TypeError as e:
        raise ValueError(f"{p}: {e}") from None
