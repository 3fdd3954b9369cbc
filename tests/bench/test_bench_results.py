"""results.json schema: valid files round-trip, bad ones are rejected naming the file and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeinfer.bench.results import (
    ResultsError,
    clean,
    read_results,
    validate,
    write_results,
)


def minimal() -> dict:
    return dict(schema="moeinfer-bench-results", schema_version=1, created="2026-01-01T00:00:00+00:00",
                git_commit=None, hardware=dict(cpu="x", cpu_cores=2, device="cpu", gpu=None),
                software=dict(moeinfer="0.1.0", python="3.11", torch="2"), peaks=None,
                energy_setup=dict(available=False, sources=[], idle_watts={}, reason="no RAPL"),
                config=dict(models=["tiny"], axes={}, mode="product", scale=1.0, seed=0, slo={}), points=[])


def pct(x: float | None = 0.1) -> dict:
    return {"p50": x, "p90": x, "p99": x}


def point() -> dict:
    return dict(
        id="tiny/chat", status="ok", error=None, seconds=1.0,
        config=dict(model="tiny", workload="chat", kernel="reference", compression="none", routing="default",
                    offload="none", dtype=None, batch_size=None),
        workload=dict(name="chat", version=1, kind="sequential", prompt_tokens=8, output_tokens=4, num_requests=1,
                      batch_size=1, notes=[]),
        raw=dict(requests=[dict(sent=0.0, prompt_tokens=8, token_times=[0.1, 0.2, 0.3, 0.4])],
                 forwards=[[0.1, 1, 8, 8, [2], [16]]], energy=dict(measurable=False, reason="no"),
                 peak_rss_bytes=1, gpu_peak_bytes=None),
        metrics=dict(
            latency=dict(requests=1, output_tokens=4, duration_s=0.4, throughput_tok_s=10.0, goodput_req_s=2.5,
                         slo_attainment=1.0, ttft_s=pct(), tpot_s=pct(), latency_s=pct()),
            memory=dict(weight_bytes=10, bits_per_param=16.0, kv_cache_bytes=4, peak_rss_bytes=1, gpu_peak_bytes=None),
            moe=dict(distinct_mean_decode=2.0, imbalance_mean=1.5),
            utilization=dict(measured=None, datasheet=None),
            quality=dict(english=dict(bits_per_byte=2.0)),
            energy=dict(measurable=False, j_per_output_token=None, reason="no RAPL")))


def test_valid_files_round_trip(tmp_path: Path) -> None:
    doc = minimal()
    doc["points"] = [point()]
    doc["points"][0]["metrics"]["latency"]["tpot_s"] = pct(float("nan"))  # NaN is written as null
    write_results(doc, tmp_path / "r.json")
    back = read_results(tmp_path / "r.json")
    assert back["points"][0]["metrics"]["latency"]["tpot_s"]["p50"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("points"), "(top level): 'points' is a required property"),
    (lambda d: d["points"][0]["metrics"]["latency"].update(ttft_s="fast"), "points[0].metrics.latency.ttft_s: "),
    (lambda d: d["points"][0].update(status="maybe"), "points[0].status: 'maybe' is not one of"),
    (lambda d: d["points"][0]["config"].pop("routing"), "points[0].config: 'routing' is a required property"),
    (lambda d: d["points"][0]["raw"]["requests"][0].update(token_times=["x"]),
     "points[0].raw.requests[0].token_times[0]: 'x' is not of type 'number'"),
])
def test_bad_results_are_rejected_with_the_field(tmp_path: Path, mutate, message: str) -> None:
    doc = minimal()
    doc["points"] = [point()]
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ResultsError) as e:
        read_results(path)
    assert str(path) in str(e.value) and message in str(e.value)
    with pytest.raises(ResultsError):
        write_results(doc, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists() and len(list(tmp_path.iterdir())) == 1


def test_wrong_files_and_versions(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ResultsError, match="not a readable JSON file"):
        read_results(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"hello": 1}')
    with pytest.raises(ResultsError, match="not a moeinfer bench results file"):
        read_results(tmp_path / "y.json")
    doc = minimal()
    doc["schema_version"] = 99
    with pytest.raises(ResultsError, match="schema_version 99 is not supported"):
        validate(doc, "z.json")


def test_clean_makes_json_ready() -> None:
    import numpy as np

    assert clean({"a": (1, float("inf")), "b": np.float32(0.5), 3: [np.int64(2)]}) == {"a": [1, None], "b": 0.5,
                                                                                         "3": [2]}
