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
