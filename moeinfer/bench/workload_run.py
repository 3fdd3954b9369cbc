"""Send one resolved workload to a model and time every token (no metrics here, only raw times).

Shapes: R requests, P prompt tokens, O output tokens, b batch size.

Two drivers, chosen by the workload's kind:
  sequential  the R prompts go in batches of b through engine.generate (greedy, eos ignored); a
              request is sent when its batch starts, and on_token timestamps each of its tokens;
  engine      the prompts go through the continuous-batching BatchEngine (max_batch = b), submitted
              at their arrival times (all at t=0 for a burst, Poisson gaps for a rate) by this
              thread while the engine thread runs the model; TokenEvents timestamp the tokens.
Both return one RequestRecord per request with times in seconds from the workload's start.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from moeinfer.bench.latency import RequestTiming
from moeinfer.bench.workloads import ResolvedWorkload
from moeinfer.engine.batching import BatchEngine, EngineRequest, ErrorEvent, FinishEvent, TokenEvent
from moeinfer.engine.generate import generate


@dataclass
class RequestRecord:
    sent: float
    prompt_tokens: int
    token_times: list[float] = field(default_factory=list)
    error: str | None = None

    def timing(self) -> RequestTiming:
        return RequestTiming(sent=self.sent, first_token=self.token_times[0], done=self.token_times[-1],
                             output_tokens=len(self.token_times))

    def to_dict(self) -> dict[str, Any]:
        return dict(sent=round(self.sent, 6), prompt_tokens=self.prompt_tokens,
                    token_times=[round(t, 6) for t in self.token_times], error=self.error)


def run_sequential(model: Any, w: ResolvedWorkload, prompts: list[list[int]]) -> list[RequestRecord]:
    t0 = time.perf_counter()
    records: list[RequestRecord] = []
    for i in range(0, len(prompts), w.batch_size):
        batch = prompts[i:i + w.batch_size]
        sent = time.perf_counter() - t0
        recs = [RequestRecord(sent=sent, prompt_tokens=len(p)) for p in batch]

        def on_token(row: int, _token: int, _delta: str, recs: list[RequestRecord] = recs) -> None:
            recs[row].token_times.append(time.perf_counter() - t0)

        generate(model, batch, max_new_tokens=w.output_tokens, ignore_eos=True, on_token=on_token)
        records += recs
    return records


def run_engine(model: Any, w: ResolvedWorkload, prompts: list[list[int]], arrivals: list[float], *,
               prefill_chunk: int = 256, timeout_s: float = 3600.0) -> list[RequestRecord]:
    engine = BatchEngine(model, max_batch=w.batch_size, max_queue=len(prompts) + 1, prefill_chunk=prefill_chunk,
                         max_context=w.prompt_tokens + w.output_tokens).start()
    records = [RequestRecord(sent=0.0, prompt_tokens=len(p)) for p in prompts]
    left = [len(prompts)]
    all_done = threading.Event()
    lock = threading.Lock()
    t0 = time.perf_counter()

    def handler(rec: RequestRecord):
        def on_event(ev: Any) -> None:
            if isinstance(ev, TokenEvent):
                rec.token_times.append(time.perf_counter() - t0)
            elif isinstance(ev, (FinishEvent, ErrorEvent)):
                if isinstance(ev, ErrorEvent):
                    rec.error = ev.message
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        all_done.set()
        return on_event

    try:
        for rec, prompt, at in zip(records, prompts, arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            rec.sent = time.perf_counter() - t0
            engine.submit(EngineRequest(prompt_ids=prompt, max_new_tokens=w.output_tokens,
                                        eos_token_ids=frozenset()), handler(rec))
        if not all_done.wait(timeout_s):
            raise TimeoutError(f"workload {w.name}: requests still running after {timeout_s:.0f} s")
    finally:
        engine.stop(timeout=1.0)
    errors = [r.error for r in records if r.error]
    if errors:
        raise RuntimeError(f"workload {w.name}: {len(errors)} request(s) failed, first: {errors[0]}")
    return records


def run_workload(model: Any, w: ResolvedWorkload, prompts: list[list[int]],
                 arrivals: list[float]) -> list[RequestRecord]:
    if w.kind == "sequential":
        return run_sequential(model, w, prompts)
    return run_engine(model, w, prompts, arrivals)
