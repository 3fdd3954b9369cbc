"""Energy readers against fake counters: RAPL sysfs folders in tmp_path and a fake NVML module."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeinfer.bench.energy import EnergyMeter, NotMeasurable, default_meter, rapl_zones


def _zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int = 1_000_000) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "name").write_text(label + "\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


class Clock:
    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def test_rapl_package_zones_only(tmp_path: Path) -> None:
    _zone(tmp_path, "intel-rapl:0", "package-0", 5)
    _zone(tmp_path, "intel-rapl:0:0", "core", 5)  # a sub-zone: part of package 0, not added again
    _zone(tmp_path, "intel-rapl:1", "package-1", 5)
    assert [z.name for z in rapl_zones(tmp_path)] == ["rapl:package-0", "rapl:package-1"]


def test_rapl_wrap_around_and_idle(tmp_path: Path) -> None:
    z = _zone(tmp_path, "intel-rapl:0", "package-0", 900_000)  # 0.9 J, wraps at 1 J
    meter = EnergyMeter(rapl_zones(tmp_path), interval_s=0, min_window_s=1.0, clock=Clock(10.0, 12.0))
    meter.start()
    (z / "energy_uj").write_text("100000\n")  # wrapped: +0.2 J
    meter.sample()
    (z / "energy_uj").write_text("300000\n")  # +0.2 J
    meter.idle_watts = {"rapl:package-0": 0.05}
    r = meter.stop()
    assert r.measurable and r.seconds == pytest.approx(2.0)
    assert r.total_j == pytest.approx(0.4)
    assert r.above_idle_j == pytest.approx(0.4 - 0.05 * 2.0)


def test_rapl_unreadable_is_not_measurable(tmp_path: Path) -> None:
    z = _zone(tmp_path, "intel-rapl:0", "package-0", 5)
    (z / "energy_uj").unlink()
    (z / "energy_uj").mkdir()  # unreadable as a file (permissions do not stop root)
    with pytest.raises(NotMeasurable, match="intel-rapl:0 is not readable"):
        rapl_zones(tmp_path)
    meter = default_meter("cpu", rapl_root=tmp_path)
    assert not meter.available
    r = meter.stop()
    assert not r.measurable and r.total_j is None and "not readable" in r.reason
    (z / "energy_uj").rmdir()
    (z / "energy_uj").write_text("garbage\n")
    assert not default_meter("cpu", rapl_root=tmp_path).available


def test_no_powercap_says_why(tmp_path: Path) -> None:
    meter = default_meter("cpu", rapl_root=tmp_path / "nope")
    assert not meter.available and "does not exist" in meter.unavailable
    assert meter.measure_idle(0) == {}


def test_short_window_is_not_measurable(tmp_path: Path) -> None:
    _zone(tmp_path, "intel-rapl:0", "package-0", 0)
    meter = EnergyMeter(rapl_zones(tmp_path), interval_s=0, min_window_s=1.0, clock=Clock(0.0, 0.4))
    meter.start()
    r = meter.stop()
    assert not r.measurable and "0.40 s < 1 s" in r.reason


class FakeNVML:
    """The three pynvml calls the reader uses; energy in millijoules."""

    def __init__(self, readings_mj: list[int], fail: bool = False) -> None:
        self.readings, self.fail = list(readings_mj), fail

    def nvmlInit(self) -> None:
        if self.fail:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"gpu{i}"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


def test_nvml_energy_with_idle_subtracted(tmp_path: Path) -> None:
    # init read, start read, end read (mJ): 150 J over 1.5 s
    nvml = FakeNVML([1_000_000, 1_000_000, 1_150_000])
    meter = default_meter("cuda:0", nvml=nvml, rapl_root=tmp_path / "none", min_window_s=1.0)
    assert meter.available and [c.name for c in meter.counters] == ["nvml:gpu0"]
    assert any("CPU" in n for n in meter.notes)  # the missing CPU counter is said, not hidden
    meter.clock = Clock(0.0, 1.5)
    meter.interval_s = 0
    meter.idle_watts = {"nvml:gpu0": 60.0}
    meter.start()
    r = meter.stop()
    assert r.total_j == pytest.approx(150.0) and r.above_idle_j == pytest.approx(150.0 - 90.0)


def test_nvml_missing_makes_gpu_energy_not_measurable(tmp_path: Path) -> None:
    meter = default_meter("cuda", nvml=FakeNVML([0], fail=True), rapl_root=tmp_path)
    assert not meter.available and "NVML" in meter.unavailable
