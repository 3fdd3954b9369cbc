"""Prometheus metrics of the server and engine (text exposition format at /metrics)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class EngineCollector:
    """Reads the engine's state at scrape time: batch, queue, throughput, expert load, faults."""

    def __init__(self, engine: Any, expert_load: Any, faults: Any) -> None:
        self.engine, self.expert_load, self.faults = engine, expert_load, faults
        self._last = (time.monotonic(), 0)

    def collect(self):  # noqa: ANN201 - prometheus_client protocol
        stats = self.engine.stats
        yield GaugeMetricFamily("moeinfer_batch_size", "Requests in the running decode batch", value=stats.running)
        yield GaugeMetricFamily("moeinfer_queue_depth", "Requests waiting for a batch slot", value=stats.waiting)
        now, tokens = time.monotonic(), stats.tokens_generated
        then, before = self._last
        self._last = (now, tokens)
        yield GaugeMetricFamily("moeinfer_tokens_per_second", "Generated tokens per second since the last scrape",
                                value=(tokens - before) / max(now - then, 1e-9))
        load = CounterMetricFamily("moeinfer_expert_tokens", "Tokens routed to each expert",
                                   labels=["layer", "expert"])
        for layer, counts in self.expert_load.items():
            for expert, n in enumerate(counts):
                load.add_metric([str(layer), str(expert)], float(n))
        yield load
        yield CounterMetricFamily("moeinfer_degraded_tokens", "Tokens rerouted because an expert was unavailable",
                                  value=float(self.faults.degraded_tokens))
        yield GaugeMetricFamily("moeinfer_masked_experts", "Experts masked after a fault",
                                value=float(self.faults.count()))
        hit_rate = getattr(self.engine.model, "expert_cache_hit_rate", None)
        if callable(hit_rate):
            yield GaugeMetricFamily("moeinfer_expert_cache_hit_rate", "Expert cache hit rate (offloading)",
                                    value=float(hit_rate()))


class ServerMetrics:
    def __init__(self, engine: Any, expert_load: Any, faults: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("moeinfer_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("moeinfer_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("moeinfer_time_per_output_token_seconds", "Mean time per output token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("moeinfer_request_latency_seconds", "End-to-end request latency",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("moeinfer_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("moeinfer_generated_tokens", "Tokens generated", registry=r)
        r.register(EngineCollector(engine, expert_load, faults))

    def observe_finish(self, ev: Any) -> None:
        self.ttft.observe(ev.ttft_s)
        if ev.tpot_s is not None:
            self.tpot.observe(ev.tpot_s)
        self.latency.observe(ev.latency_s)
        self.prompt_tokens.inc(ev.prompt_tokens)
        self.generated_tokens.inc(len(ev.token_ids))
