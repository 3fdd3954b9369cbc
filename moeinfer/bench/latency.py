"""Latency metrics of generation requests, with the definitions used in every moeinfer report.

For request i: TTFT_i = t_first_token - t_sent; TPOT_i = (t_last_token - t_first_token) / (n_i - 1)
for n_i >= 2 output tokens; latency_i = t_last_token - t_sent.
Throughput = sum_i n_i / (max_i t_last_token - min_i t_sent).
Goodput (DistServe, Zhong et al., 2024) = requests per second that met the SLO on both TTFT and
TPOT; the default SLO is MLPerf's Mixtral-8x7B server limit (TTFT <= 2 s, TPOT <= 200 ms).
Percentiles use linear interpolation between order statistics (numpy's default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RequestTiming:
    sent: float  # seconds, any common clock
    first_token: float
    done: float
    output_tokens: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.sent

    @property
    def tpot(self) -> float | None:
        return (self.done - self.first_token) / (self.output_tokens - 1) if self.output_tokens > 1 else None

    @property
    def latency(self) -> float:
        return self.done - self.sent


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 2.0
    tpot_s: float = 0.2

    def met(self, t: RequestTiming) -> bool:
        return t.ttft <= self.ttft_s and (t.tpot is None or t.tpot <= self.tpot_s)


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """{"p50": ..., "p90": ..., "p99": ...}; NaN for an empty list."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    return {f"p{q:g}": (float(np.percentile(arr, q)) if arr.size else float("nan")) for q in qs}


def summarize(timings: Sequence[RequestTiming], slo: SLO | None = None) -> dict[str, object]:
    """Throughput, goodput and TTFT/TPOT/latency percentiles of a set of finished requests."""
    if not timings:
        raise ValueError("no finished requests to summarize")
    slo = slo or SLO()
    span = max(t.done for t in timings) - min(t.sent for t in timings)
    tokens = sum(t.output_tokens for t in timings)
    good = sum(slo.met(t) for t in timings)
    return dict(
        requests=len(timings), output_tokens=tokens, duration_s=span,
        throughput_tok_s=tokens / span if span > 0 else float("inf"),
        request_rate=len(timings) / span if span > 0 else float("inf"),
        goodput_req_s=good / span if span > 0 else float("inf"), slo_attainment=good / len(timings),
        ttft_s=percentiles([t.ttft for t in timings]), tpot_s=percentiles([t.tpot for t in timings]),
        latency_s=percentiles([t.latency for t in timings]),
    )
