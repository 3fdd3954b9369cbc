"""bench_moe's interleaved decode rounds (`interleaved_rates`): every configuration warmed up once,
then measured once per round, the order rotated each round; the rates are 1 / the median gap between
a generation's token stamps (a fake clock here: no timing)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_moe  # noqa: E402


def test_rounds_rotate_the_order_and_rate_each_configuration(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(bench_moe, "CLOCK", lambda: clock[0])
    calls: list[str] = []

    def runner(label: str, step: float):
        def run(stamp):
            calls.append(label)
            for _ in range(8):  # 8 tokens, `step` seconds apart
                clock[0] += step
                stamp()
        return run

    runs = {"a": runner("a", 0.01), "b": runner("b", 0.02), "c": runner("c", 0.04)}
    rates = bench_moe.interleaved_rates(runs, 8, rounds=3)
    assert calls == ["a", "b", "c",  # warm-up
                     "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: [round(r, 6) for r in v] for k, v in rates.items()} == {"a": [100.0] * 3, "b": [50.0] * 3,
                                                                        "c": [25.0] * 3}
