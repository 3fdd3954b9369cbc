"""moeinfer.cpuinfo: the CPU's name and flags recorded beside measurements."""

from __future__ import annotations

import platform
from pathlib import Path

from moeinfer import cpuinfo


def test_flags_and_name_from_proc_cpuinfo(monkeypatch) -> None:
    text = "processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse2 avx2 amx_tile\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text)
    assert cpuinfo.cpu_name() == "Example CPU 9000"
    assert cpuinfo.cpu_flags() == ["fpu", "sse2", "avx2", "amx_tile"]


def test_without_proc_cpuinfo(monkeypatch) -> None:
    def unreadable(self, *a, **k):
        raise OSError("no /proc")

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert cpuinfo.cpu_flags() == []
    assert cpuinfo.cpu_name() == (platform.processor() or platform.machine())


def _cache(root: Path, index: int, level: int, kind: str, size: str) -> None:
    d = root / f"index{index}"
    d.mkdir(parents=True)
    (d / "level").write_text(f"{level}\n")
    (d / "type").write_text(f"{kind}\n")
    (d / "size").write_text(f"{size}\n")


def test_last_level_cache_from_sysfs(tmp_path, monkeypatch) -> None:
    _cache(tmp_path, 0, 1, "Data", "32K")
    _cache(tmp_path, 1, 1, "Instruction", "32K")
    _cache(tmp_path, 2, 2, "Unified", "512K")
    _cache(tmp_path, 3, 3, "Unified", "32768K")
    assert cpuinfo.last_level_cache_bytes(tmp_path) == 32 << 20
    # without sysfs: sysconf, else the default
    monkeypatch.setattr(cpuinfo.os, "sysconf", lambda name: 8 << 20)
    assert cpuinfo.last_level_cache_bytes(tmp_path / "absent") == 8 << 20
    monkeypatch.setattr(cpuinfo.os, "sysconf", lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert cpuinfo.last_level_cache_bytes(tmp_path / "absent") == cpuinfo.DEFAULT_LLC_BYTES
