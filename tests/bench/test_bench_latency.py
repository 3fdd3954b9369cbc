"""Latency metric formulas on synthetic timings with known answers."""

from __future__ import annotations

import math

import pytest

from moeinfer.bench.latency import SLO, RequestTiming, percentiles, summarize


def test_per_request_quantities():
    t = RequestTiming(sent=1.0, first_token=1.5, done=3.5, output_tokens=5)
    assert t.ttft == 0.5 and t.tpot == 0.5 and t.latency == 2.5
    assert RequestTiming(0, 1, 1, 1).tpot is None


def test_percentiles_interpolate():
    p = percentiles([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert p["p50"] == 5.5 and p["p90"] == pytest.approx(9.1) and p["p99"] == pytest.approx(9.91)
    assert math.isnan(percentiles([])["p50"])
    assert percentiles([None, 3.0])["p50"] == 3.0


def test_summary_throughput_and_goodput():
    timings = [RequestTiming(0.0, 1.0, 2.0, 11),   # tpot 0.1: meets the SLO
               RequestTiming(1.0, 4.0, 5.0, 11),   # ttft 3 s: misses
               RequestTiming(2.0, 2.5, 10.0, 11)]  # tpot 0.75 s: misses
    s = summarize(timings)
    assert s["duration_s"] == 10.0 and s["output_tokens"] == 33
    assert s["throughput_tok_s"] == pytest.approx(3.3)
    assert s["goodput_req_s"] == pytest.approx(0.1) and s["slo_attainment"] == pytest.approx(1 / 3)
    loose = summarize(timings, SLO(ttft_s=5, tpot_s=1))
    assert loose["slo_attainment"] == 1.0
    with pytest.raises(ValueError):
        summarize([])
