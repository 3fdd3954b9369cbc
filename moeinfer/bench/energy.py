"""Energy, measured from hardware counters and never estimated.

Sources (each a cumulative counter read in joules):
  RAPL   CPU package energy, /sys/class/powercap/intel-rapl:N/energy_uj (microjoules; the counter
         wraps at max_energy_range_uj); on Linux also exposed for AMD Zen packages.
  NVML   GPU total energy since driver load, nvmlDeviceGetTotalEnergyConsumption (millijoules, 64-bit).

A measurement follows MLPerf Power's rules in spirit:
1. before the sweep, measure each source's idle power over a window of at least `min_window_s`;
2. during a point, read every counter at the start, every `interval_s` in a background thread (so a
   RAPL wrap between two reads is seen once and undone), and at the end;
3. joules = sum of the deltas; joules above idle = joules - idle watts * seconds;
4. a window shorter than `min_window_s`, or a source that cannot be read, gives "not measurable"
   with the reason, never a number.
The zeus package (0.16) was considered: it hard-depends on pandas, scikit-learn, amdsmi, tyro and
httpx, tracks RAPL wrap-around with a polling subprocess per file, and its sysfs paths are module
constants that tests cannot point at a fake folder; these two small readers do what is needed.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

RAPL_ROOT = Path("/sys/class/powercap")


class NotMeasurable(RuntimeError):
    """Energy cannot be measured here; the message says why."""


class Counter(Protocol):
    name: str
    wrap_j: float | None  # the counter returns to 0 after this many joules (None: never)

    def read_j(self) -> float: ...


@dataclass
class RaplZone:
    """One RAPL package zone: energy_uj (microjoules) wrapping at max_energy_range_uj."""

    path: Path
    name: str = ""
    wrap_j: float | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        try:
            label = (self.path / "name").read_text().strip() if (self.path / "name").exists() else ""
            self.name = f"rapl:{label or self.path.name}"
            self.wrap_j = int((self.path / "max_energy_range_uj").read_text()) / 1e6
            self.read_j()
        except (OSError, ValueError) as e:
            raise NotMeasurable(f"RAPL zone {self.path} is not readable: {e}") from e

    def read_j(self) -> float:
        return int((self.path / "energy_uj").read_text()) / 1e6


def rapl_zones(root: str | Path = RAPL_ROOT) -> list[RaplZone]:
    """The package zones (intel-rapl:N, not their sub-zones) under `root`; raises NotMeasurable."""
    root = Path(root)
    if not root.is_dir():
        raise NotMeasurable(f"{root} does not exist (RAPL not exposed: no driver, a VM or a container)")
    dirs = sorted(p for p in root.iterdir() if re.fullmatch(r"intel-rapl:\d+", p.name))
    if not dirs:
        raise NotMeasurable(f"{root} has no intel-rapl:N package zones")
    return [RaplZone(d) for d in dirs]  # one unreadable zone makes the package total unknowable


@dataclass
class NvmlGpu:
    """One GPU's NVML total-energy counter (millijoules since the driver loaded)."""

    nvml: Any
    index: int = 0
    name: str = ""
    wrap_j: float | None = None

    def __post_init__(self) -> None:
        try:
            self.nvml.nvmlInit()
            self.handle = self.nvml.nvmlDeviceGetHandleByIndex(self.index)
            self.name = f"nvml:gpu{self.index}"
            self.read_j()
        except Exception as e:  # NVMLError_NotSupported (pre-Volta), no driver, ...
            raise NotMeasurable(f"NVML energy counter of GPU {self.index} is not readable: {e}") from e

    def read_j(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3


def nvml_gpus(indices: list[int], nvml: Any = None) -> list[NvmlGpu]:
    if nvml is None:
        try:
            import pynvml as nvml  # the nvidia-ml-py package
        except ImportError as e:
            raise NotMeasurable("GPU energy needs NVML: pip install nvidia-ml-py") from e
    return [NvmlGpu(nvml, i) for i in indices]


@dataclass
class EnergyReading:
    """One window's energy per source, or why it is not measurable."""

    measurable: bool
    seconds: float
    joules: dict[str, float] = field(default_factory=dict)
    idle_watts: dict[str, float] = field(default_factory=dict)
    reason: str | None = None

    @property
    def total_j(self) -> float | None:
        return sum(self.joules.values()) if self.measurable else None

    @property
    def above_idle_j(self) -> float | None:
        if not self.measurable:
            return None
        return sum(j - self.idle_watts.get(s, 0.0) * self.seconds for s, j in self.joules.items())

    def to_dict(self) -> dict[str, Any]:
        return dict(measurable=self.measurable, seconds=self.seconds, joules=self.joules,
                    idle_watts=self.idle_watts, total_j=self.total_j, above_idle_j=self.above_idle_j,
                    reason=self.reason)


class EnergyMeter:
    """Accumulates counter deltas over a window (steps 2-4 of the module docstring)."""

    def __init__(self, counters: list[Counter], *, interval_s: float = 0.5, min_window_s: float = 1.0,
                 unavailable: str | None = None, clock: Any = time.perf_counter) -> None:
        self.counters = counters
        self.interval_s, self.min_window_s = interval_s, min_window_s
        self.unavailable = unavailable if counters else (unavailable or "no energy counter on this machine")
        self.idle_watts: dict[str, float] = {}
        self.clock = clock
        self._last: dict[str, float] = {}
        self._acc: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._failed: str | None = None
        self.notes: list[str] = []  # sources that could not be read, while others can

    @property
    def available(self) -> bool:
        return not self.unavailable

    def sample(self) -> None:
        """Add every counter's change since its last read (the poll thread calls this)."""
        with self._lock:
            for c in self.counters:
                try:
                    v = c.read_j()
                except (OSError, ValueError) as e:
                    self._failed = f"{c.name} stopped being readable: {e}"
                    continue
                d = v - self._last[c.name]
                if d < 0 and c.wrap_j:
                    d += c.wrap_j  # 2. one wrap between two reads
                self._acc[c.name] += d
                self._last[c.name] = v

    def start(self) -> None:
        if not self.available:
            return
        self._failed = None
        self._last = {c.name: c.read_j() for c in self.counters}
        self._acc = {c.name: 0.0 for c in self.counters}
        self._t0 = self.clock()
        self._stop.clear()
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._poll, name="moeinfer-energy", daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def stop(self) -> EnergyReading:
        if not self.available:
            return EnergyReading(False, 0.0, reason=self.unavailable)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()
        seconds = self.clock() - self._t0
        if self._failed:
            return EnergyReading(False, seconds, reason=self._failed)
        if seconds < self.min_window_s:  # 4.
            return EnergyReading(False, seconds, reason=f"window {seconds:.2f} s < {self.min_window_s:g} s: "
                                                       "too short for the counters' resolution")
        return EnergyReading(True, seconds, joules=dict(self._acc), idle_watts=dict(self.idle_watts))

    def measure_idle(self, seconds: float) -> dict[str, float]:
        """1. Idle watts per source over `seconds` (at least min_window_s) of doing nothing."""
        if not self.available:
            return {}
        self.start()
        time.sleep(max(seconds, self.min_window_s))
        r = self.stop()
        if r.measurable:
            self.idle_watts = {s: j / r.seconds for s, j in r.joules.items()}
        return self.idle_watts


def default_meter(device: str = "cpu", *, min_window_s: float = 1.0, rapl_root: str | Path = RAPL_ROOT,
                  nvml: Any = None) -> EnergyMeter:
    """CPU package energy from RAPL plus, on CUDA, the GPU's NVML counter; reasons for what is missing."""
    counters: list[Counter] = []
    reasons: list[str] = []
    try:
        counters += rapl_zones(rapl_root)
    except NotMeasurable as e:
        reasons.append(f"CPU: {e}")
    if device.startswith("cuda"):
        idx = int(device.split(":")[1]) if ":" in device else 0
        try:
            counters += nvml_gpus([idx], nvml)
        except NotMeasurable as e:
            reasons.append(f"GPU: {e}")
        # On a GPU the run's energy is the GPU's and the CPU's together: a missing GPU counter
        # makes the total unknowable.
        if any(r.startswith("GPU") for r in reasons):
            return EnergyMeter([], min_window_s=min_window_s, unavailable="; ".join(reasons))
    meter = EnergyMeter(counters, min_window_s=min_window_s, unavailable="; ".join(reasons) if not counters else None)
    meter.notes = reasons if counters else []
    return meter
