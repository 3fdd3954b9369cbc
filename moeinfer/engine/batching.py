"""Continuous batching: requests join and leave the running batch at every decode step.

Follows Orca (Yu et al., OSDI 2022: iteration-level scheduling) with chunked prefill in the manner of
Sarathi (Agrawal et al., 2023): a newcomer's prompt is prefilled at most `prefill_chunk` tokens per
step, so running streams keep getting one token per step while long prompts arrive.

Shapes: R running rows (the decode batch), V vocab. The KV cache has `max_batch` rows; running
requests always occupy rows [0, R) and the request being prefilled occupies row R, so every forward
works on a contiguous view of the cache. A finished or cancelled request's row is refilled at once
by moving the last row into it.

Each engine step:
1. take new requests from the inbox (the queue is bounded: `submit` raises QueueFull when full);
2. drop cancelled requests (client disconnects) and free their rows;
3. prefill one chunk of the request at the head of the queue, if a row is free; when its prompt is
   done, sample its first token and let it join the decode batch;
4. decode one token for every running row, sample per request (own seed, temperature, top-p), and
   retire rows that hit eos, a stop string or max_new_tokens.
The model runs on one dedicated thread; results reach callers through a callback.

Failures stay with the request that caused them: an error while sampling, detokenizing or delivering
one request's token ends that request with an `ErrorEvent` and nothing else; a failed forward ends
the requests of that forward (the prefill forward holds one request; a decode forward holds the
running rows, or one row in deterministic mode).

Deterministic mode (`deterministic=True`) decodes every running row in its own forward, so the
numbers a request sees never depend on which other requests share the batch: its tokens are the same
alone or in any crowd, in bf16 as in fp32 (the kernels' reductions then always see one row; the
prefill forward already holds one request). This is the batch-invariance that vLLM and SGLang offer
as a mode; it costs throughput, since R rows take R forwards.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from moeinfer.engine.detokenize import TextStream
from moeinfer.engine.lockstep import LocalOps
from moeinfer.engine.sampling import SamplingParams, sample
from moeinfer.model.kv_cache import KVCache
from moeinfer.model.transformer import MoEModel

log = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "the server shut down before this request finished"


class QueueFull(RuntimeError):
    """The engine's bounded queue is full; retry later."""


@dataclass(frozen=True)
class EngineRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    eos_token_ids: frozenset[int] | None = None  # None: the model's


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str


@dataclass(frozen=True)
class FinishEvent:
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "length", "eos", "stop" or "cancelled"
    prompt_tokens: int
    ttft_s: float
    tpot_s: float | None  # mean time per output token after the first
    latency_s: float


@dataclass(frozen=True)
class ErrorEvent:
    message: str


Event = Union[TokenEvent, FinishEvent, ErrorEvent]
EventCallback = Callable[[Event], None]


class RequestHandle:
    """Returned by `submit`: an id and a way to cancel (e.g. when the client disconnects)."""

    _ids = itertools.count()

    def __init__(self) -> None:
        self.id = f"req-{next(self._ids)}"
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Active:
    handle: RequestHandle
    req: EngineRequest
    on_event: EventCallback
    stream: TextStream
    generator: torch.Generator | None
    eos: frozenset[int]
    submitted: float
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    finish_reason: str | None = None
    error: str | None = None  # set when this request failed; it then ends with an ErrorEvent


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    requests_finished: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    steps: int = 0


class BatchEngine:
    """Serve many concurrent generation requests over one model with continuous batching."""

    def __init__(self, model: MoEModel, *, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 256,
                 max_context: int | None = None, ops: Any = None, deterministic: bool = False) -> None:
        """`ops` runs the model and cache operations (default: LocalOps on `self.cache`; LeaderOps
        under expert parallelism, see moeinfer.engine.lockstep). `deterministic`: decode each row in
        its own forward, so a request's tokens do not depend on the rest of the batch (module doc)."""
        if max_batch < 1 or max_queue < 1 or prefill_chunk < 1:
            raise ValueError("max_batch, max_queue and prefill_chunk must be >= 1")
        self.model = model
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.deterministic = deterministic
        self.cache = make_cache(model, max_batch=max_batch, max_context=max_context)
        self.max_context = self.cache.max_length
        self.ops = ops(model, self.cache) if ops is not None else LocalOps(model, self.cache)
        self.stats = EngineStats()
        self._inbox: deque[_Active] = deque()
        self._waiting: deque[_Active] = deque()
        self._running: list[_Active] = []  # row i holds _running[i]
        self._prefilling: _Active | None = None  # occupies row len(_running)
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.default_eos = frozenset(model.config.eos_token_ids) | (
            frozenset([model.tokenizer.eos_token_id])
            if model.tokenizer is not None and model.tokenizer.eos_token_id is not None else frozenset())

    # -- public API -------------------------------------------------------------------------------
    def start(self) -> BatchEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="moeinfer-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish in-flight requests for up to `timeout` seconds; what is left then ends with an
        `ErrorEvent` saying the server shut down."""
        deadline = time.monotonic() + timeout
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic() + 1.0))
        self.ops.close()
        for a in [*self._inbox, *self._waiting, *self._running, *([self._prefilling] if self._prefilling else [])]:
            if a.handle.cancelled.is_set():
                self._finish(a, "cancelled")
            else:
                a.error = SHUTDOWN_MESSAGE
                self._finish(a, None)
        self._inbox.clear()
        self._waiting.clear()
        self._running.clear()
        self._prefilling = None

    def busy(self) -> bool:
        return bool(self._inbox or self._waiting or self._running or self._prefilling)

    def validate(self, req: EngineRequest) -> None:
        n = len(req.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if req.max_new_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {req.max_new_tokens}")
        if n + req.max_new_tokens > self.max_context:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({req.max_new_tokens}) exceeds the context "
                             f"length of {self.max_context} tokens")
        bad = [t for t in req.prompt_ids if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise ValueError(f"prompt has token ids outside 0..{self.model.config.vocab_size - 1}: {bad[:5]}")

    def submit(self, req: EngineRequest, on_event: EventCallback) -> RequestHandle:
        """Queue a request; raises ValueError for a bad request and QueueFull when the queue is full."""
        self.validate(req)
        handle = RequestHandle()
        s = req.sampling
        gen = None
        if s.temperature > 0:
            gen = torch.Generator(device=self.model.device)
            gen.manual_seed(s.seed if s.seed is not None else torch.seed())
        active = _Active(handle=handle, req=req, on_event=on_event,
                         stream=TextStream(self.model.tokenizer, req.stop), generator=gen,
                         eos=req.eos_token_ids if req.eos_token_ids is not None else self.default_eos,
                         submitted=time.perf_counter())
        with self._cv:
            if self._stop:
                raise QueueFull("the engine is shutting down")
            if len(self._inbox) + len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self._inbox.append(active)
            self._cv.notify()
        return handle

    # -- engine thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.busy():
                    self._cv.wait()
                if self._stop:
                    return
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # not one request's fault (step bookkeeping): fail the batch, keep serving
                log.exception("engine step failed")
                rows = [*self._running, *([self._prefilling] if self._prefilling else [])]
                for i in range(len(rows)):
                    self._quietly(self.ops.clear_row, i)
                self._running.clear()
                self._prefilling = None
                for a in rows:
                    a.error = a.error or _describe(e)
                    self._finish(a, None)

    def _step(self) -> None:
        self.stats.steps += 1
        # 2. Cancelled requests leave at once.
        for a in [a for a in self._waiting if a.handle.cancelled.is_set()]:
            self._waiting.remove(a)
            self._finish(a, "cancelled")
        if self._prefilling is not None and self._prefilling.handle.cancelled.is_set():
            self.ops.clear_row(len(self._running))
            self._finish(self._prefilling, "cancelled")
            self._prefilling = None
        self._retire([i for i, a in enumerate(self._running) if a.handle.cancelled.is_set()], "cancelled")

        # 3. Prefill one chunk of the next request; a failure ends that request alone.
        if self._prefilling is None and self._waiting and len(self._running) < self.max_batch:
            self._prefilling = self._waiting.popleft()
        if self._prefilling is not None:
            a = self._prefilling
            try:
                self._prefill_chunk(a)
            except Exception as e:
                log.warning("request %s failed in prefill: %s", a.handle.id, _describe(e))
                self._prefilling = None
                self._quietly(self.ops.clear_row, len(self._running))
                a.error = _describe(e)
                self._finish(a, None)

        # 4. One decode step for every running row (one forward per row in deterministic mode).
        if self._running:
            self._decode()
        self.stats.running = len(self._running)
        self.stats.waiting = len(self._waiting) + len(self._inbox)

    def _decode(self) -> None:
        rows = len(self._running)
        groups = [(i, i + 1) for i in range(rows)] if self.deterministic else [(0, rows)]
        ended: list[int] = []
        for start, stop in groups:
            try:
                logits = self.ops.forward([[a.generated[-1]] for a in self._running[start:stop]], start, stop)
            except Exception as e:  # the rows of this forward cannot go on
                log.warning("decode forward of rows %d..%d failed: %s", start, stop - 1, _describe(e))
                for i in range(start, stop):
                    self._running[i].error = _describe(e)
                ended += range(start, stop)
                continue
            for i in range(start, stop):
                a = self._running[i]
                try:
                    if self._accept(a, logits[i - start:i - start + 1]):
                        ended.append(i)
                except Exception as e:  # this request alone fails
                    log.warning("request %s failed: %s", a.handle.id, _describe(e))
                    a.error = _describe(e)
                    ended.append(i)
        self._retire(ended, None)

    def _prefill_chunk(self, a: _Active) -> None:
        """Prefill a's next chunk in row len(_running); when its prompt is done, sample its first token
        and move it to the decode batch (or finish it). `_prefilling` stays a until then, so a failure
        anywhere in here is seen by the caller as a's."""
        row = len(self._running)
        prompt = a.req.prompt_ids
        if a.prefilled == 0:
            self.ops.clear_row(row)
        chunk = prompt[a.prefilled:a.prefilled + self.prefill_chunk]
        logits = self.ops.forward([chunk], row, row + 1)
        a.prefilled += len(chunk)
        if a.prefilled < len(prompt):
            return
        finished = self._accept(a, logits)
        self.stats.prompt_tokens += len(prompt)
        self._prefilling = None
        if finished:
            self.ops.clear_row(row)
            self._finish(a, a.finish_reason)
        else:
            self._running.append(a)

    def _accept(self, a: _Active, logits: torch.Tensor) -> bool:
        """Sample a's next token from logits [1, V], stream it; True when the request is finished."""
        token = int(sample(logits, a.req.sampling, a.generator)[0])
        now = time.perf_counter()
        if a.first_token_at is None:
            a.first_token_at = now
        a.generated.append(token)
        self.stats.tokens_generated += 1
        if token in a.eos:
            a.finish_reason = "eos"
        elif len(a.generated) >= a.req.max_new_tokens:
            a.finish_reason = "length"
        delta = a.stream.push(a.generated, final=a.finish_reason is not None)
        if a.stream.stopped:
            a.finish_reason = "stop"
        self._emit(a, TokenEvent(token, delta))
        return a.finish_reason is not None

    def _retire(self, rows: list[int], reason: str | None) -> None:
        """Free finished rows, keeping running rows contiguous (and the prefill row right after)."""
        for i in sorted(rows, reverse=True):
            a = self._running[i]
            last = len(self._running) - 1
            if i != last:
                self.ops.move_row(last, i)
                self._running[i] = self._running[last]
            self._running.pop()
            self.ops.clear_row(last)
            if self._prefilling is not None:  # keep the prefill row right after the running rows
                self.ops.move_row(last + 1, last)
                self.ops.clear_row(last + 1)
            self._finish(a, reason or a.finish_reason or "length")

    def _finish(self, a: _Active, reason: str | None) -> None:
        """End a: an ErrorEvent if it failed, else a FinishEvent. Never raises."""
        if a.error is None:
            try:
                now = time.perf_counter()
                first = a.first_token_at if a.first_token_at is not None else now
                n = len(a.generated)
                text = None
                if self.model.tokenizer is not None:
                    a.stream.push(a.generated, final=True)
                    text = a.stream.text
                event: Event = FinishEvent(
                    token_ids=list(a.generated), text=text, finish_reason=reason or "length",
                    prompt_tokens=len(a.req.prompt_ids), ttft_s=first - a.submitted,
                    tpot_s=(now - first) / (n - 1) if n > 1 else None, latency_s=now - a.submitted)
            except Exception as e:
                a.error = _describe(e)
        if a.error is not None:
            self.stats.requests_failed += 1
            event = ErrorEvent(a.error if a.error == SHUTDOWN_MESSAGE else f"generation failed: {a.error}")
        else:
            self.stats.requests_finished += 1
        self._emit(a, event)

    def _emit(self, a: _Active, event: Event) -> None:
        """Deliver an event; a callback that raises has lost its consumer, so its request is cancelled."""
        try:
            a.on_event(event)
        except Exception as e:
            log.warning("request %s: event callback failed (%s); cancelling it", a.handle.id, _describe(e))
            a.handle.cancel()

    def _quietly(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("engine cleanup failed")


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def make_cache(model: MoEModel, *, max_batch: int, max_context: int | None) -> KVCache:
    """The engine's KV cache: max_batch rows of the model's context (or less)."""
    length = min(max_context or model.config.max_position_embeddings, model.config.max_position_embeddings)
    return KVCache(model.config, batch_size=max_batch, max_length=length, device=model.device, dtype=model.dtype)
