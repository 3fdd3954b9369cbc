"""The FastAPI application: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

Requests become `EngineRequest`s on the continuous-batching engine's thread; its events come back
to the event loop through a per-request asyncio queue and are sent as one JSON body or as
server-sent events (`data: {...}` chunks, then `data: [DONE]`) exactly as OpenAI clients expect.

Guarantees (tested in tests/test_serve*.py):
- every error is an OpenAI-style body `{"error": {...}}`, whatever failed (moeinfer/serve/errors.py);
- a client that disconnects, streaming or not, cancels its request the moment the server sees the
  connection close (a task waits for `http.disconnect`), so its batch slot is free at the next step;
- a request that fails in the engine ends with an error; the other requests never see it;
- draining (`drain`, run on SIGTERM): /health says "draining" (503), new requests get 503, in-flight
  ones finish until the deadline; a stream cut at the deadline gets an error chunk, then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeinfer.engine.batching import (SHUTDOWN_MESSAGE, BatchEngine, EngineRequest, ErrorEvent, FinishEvent,
                                      QueueFull, TokenEvent)
from moeinfer.engine.faults import ExpertFaults, ExpertLoad
from moeinfer.engine.sampling import SamplingParams
from moeinfer.serve.errors import APIError, error_body, error_response, http_error
from moeinfer.serve.metrics import ServerMetrics
from moeinfer.serve.middleware import BodySizeLimit, ErrorShield
from moeinfer.serve.schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)


@dataclass
class ServerLimits:
    """Bounds on what one request may ask for."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # default: the engine's context - 1
    max_tokens: int | None = None  # default: the engine's context
    retry_after_s: int = 1


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def create_app(engine: BatchEngine, *, model_name: str, api_key: str | None = None,
               limits: ServerLimits | None = None, faults: Any = None, expert_load: Any = None,
               shutdown_timeout: float = 10.0, public_metrics: bool = False) -> FastAPI:
    """Build the app around a started engine. `faults`/`expert_load` feed /health and /metrics.

    With an `api_key`, /v1/* need `Authorization: Bearer <key>`, and so do /metrics, /docs, /redoc and
    /openapi.json unless `public_metrics`; /health is always open (load balancers probe it).
    `app.state.drain(timeout)` drains the server (module doc); on shutdown it runs with
    `shutdown_timeout` if nobody ran it before."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key must not be empty (leave it out to serve without a key)")
    limits = limits or ServerLimits()
    faults = faults or ExpertFaults(engine.model)
    expert_load = expert_load if expert_load is not None else ExpertLoad(engine.model)
    metrics = ServerMetrics(engine, expert_load.counts, faults)
    tokenizer = engine.model.tokenizer
    max_prompt = limits.max_prompt_tokens or engine.max_context - 1
    max_tokens_cap = limits.max_tokens or engine.max_context
    state: dict[str, Any] = {"draining": False, "drained": False, "in_flight": 0}
    idle = threading.Condition()

    def count(path: str, status: int) -> None:
        metrics.requests.labels(path if path in KNOWN_PATHS else "other", str(status)).inc()

    def drain(timeout: float) -> None:
        """Refuse new requests, let in-flight ones finish for `timeout` s, then end the rest with an
        error, and wait (briefly) until their responses are sent. Blocking; idempotent."""
        if state["drained"]:
            return
        state["draining"] = True
        log.info("draining: finishing in-flight requests for up to %.1f s", timeout)
        engine.stop(timeout)
        with idle:
            idle.wait_for(lambda: state["in_flight"] == 0, timeout=5.0)
        state["drained"] = True

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(drain, shutdown_timeout)

    app = FastAPI(title="moeinfer", version="1", summary="OpenAI-compatible MoE inference server",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.faults, app.state.state = engine, metrics, faults, state
    app.state.drain = drain

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        count(request.url.path, exc.status)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON: {(first.get('ctx') or {}).get('error', msg)}"
            loc = None
        message = f"{loc}: {msg}" if loc else msg
        count(request.url.path, 400)
        return JSONResponse(error_body(400, message, param=loc), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = http_error(exc.status_code, exc.detail, exc.__cause__, request.method, request.url.path)
        count(request.url.path, err.status)
        return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status,
                            headers=dict(exc.headers or {}))

    def authorize(request: Request, *, admin: bool = False) -> None:
        if api_key is None or (admin and public_metrics):
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def tokenize(fn: Any, param: str) -> Any:
        try:
            return fn()
        except (TypeError, ValueError) as e:  # the schemas admit only valid text; this is the backstop
            raise APIError(400, f"{param} could not be tokenized: {e}", param=param) from e

    def engine_request(body: Any, prompt_ids: list[int], max_tokens: int | None) -> EngineRequest:
        if len(prompt_ids) == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) > max_prompt:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; the limit is {max_prompt}",
                           param="prompt", code="context_length_exceeded")
        room = engine.max_context - len(prompt_ids)
        if max_tokens is None:
            max_tokens = min(room, max_tokens_cap)
        if max_tokens > max_tokens_cap:
            raise APIError(400, f"max_tokens={max_tokens} exceeds the limit of {max_tokens_cap}",
                           param="max_tokens")
        if max_tokens > room:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                           f"context length of {engine.max_context}", param="max_tokens",
                           code="context_length_exceeded")
        try:
            sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
        except ValueError as e:
            raise APIError(400, str(e), param="temperature" if "temperature" in str(e) else "top_p") from e
        return EngineRequest(prompt_ids=prompt_ids, max_new_tokens=max_tokens, sampling=sampling,
                             stop=tuple(body.stop_list()))

    async def run(request: Request, req: EngineRequest) -> tuple[Any, asyncio.Queue]:
        if state["draining"]:
            raise APIError(503, "the server is shutting down")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_event(ev: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        try:
            handle = engine.submit(req, on_event)
        except QueueFull as e:
            if state["draining"]:
                raise APIError(503, "the server is shutting down") from e
            raise APIError(429, str(e), headers={"Retry-After": str(limits.retry_after_s)}) from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        with idle:
            state["in_flight"] += 1
        return handle, queue

    def done_with(handle: Any) -> None:
        """The response of `handle` is over: cancel it if it still runs (a no-op otherwise)."""
        handle.cancel()
        with idle:
            state["in_flight"] -= 1
            idle.notify_all()

    def engine_error(ev: ErrorEvent) -> APIError:
        if ev.message == SHUTDOWN_MESSAGE:
            return APIError(503, ev.message, code="server_shutdown")
        return APIError(500, ev.message, code="generation_failed")

    async def disconnected(request: Request) -> None:
        """Returns when the client closes its connection (the body has been read by then)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def wait_finish(request: Request, handle: Any, queue: asyncio.Queue, endpoint: str) -> FinishEvent:
        gone = asyncio.ensure_future(disconnected(request))
        try:
            while True:
                nxt = asyncio.ensure_future(queue.get())
                await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    handle.cancel()  # the engine drops it at its next step
                    raise APIError(499, "client disconnected")
                ev = nxt.result()
                if isinstance(ev, FinishEvent):
                    metrics.observe_finish(ev)
                    return ev
                if isinstance(ev, ErrorEvent):
                    raise engine_error(ev)
        finally:
            gone.cancel()
            done_with(handle)

    def usage(ev: FinishEvent) -> dict[str, int]:
        n = len(ev.token_ids)
        return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": n, "total_tokens": ev.prompt_tokens + n}

    async def sse(request: Request, handle: Any, queue: asyncio.Queue, chunk: Any, include_usage: bool,
                  endpoint: str) -> AsyncIterator[str]:
        """Server-sent events of one request. Starlette cancels this generator when the client
        disconnects; the `finally` then cancels the request in the engine."""
        try:
            first = chunk(None, None, role=True)
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            while True:
                ev = await queue.get()
                if isinstance(ev, TokenEvent):
                    if ev.text:
                        yield f"data: {json.dumps(chunk(ev.text, None))}\n\n"
                elif isinstance(ev, FinishEvent):
                    metrics.observe_finish(ev)
                    final = chunk("", _finish_reason(ev.finish_reason))
                    if include_usage:
                        final["usage"] = None
                    yield f"data: {json.dumps(final)}\n\n"
                    if include_usage:
                        tail = chunk("", None)
                        tail["choices"], tail["usage"] = [], usage(ev)
                        yield f"data: {json.dumps(tail)}\n\n"
                    yield "data: [DONE]\n\n"
                    count(endpoint, 200)
                    return
                elif isinstance(ev, ErrorEvent):  # e.g. cut at the shutdown deadline: say so, then end
                    err = engine_error(ev)
                    yield f"data: {json.dumps(error_body(err.status, err.message, code=err.code))}\n\n"
                    yield "data: [DONE]\n\n"
                    count(endpoint, err.status)
                    return
        finally:
            done_with(handle)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Any:
        authorize(request)
        check_model(body.model)
        prompt: Any = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request (batched prompts are not supported)",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
            ids = tokenize(lambda: tokenizer.encode(prompt), "prompt")
        else:
            ids = [int(t) for t in prompt]
        req = engine_request(body, ids, body.max_tokens)
        handle, queue = await run(request, req)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict | None:
            if role:
                return None
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(request, handle, queue, chunk, include, "/v1/completions"),
                                     media_type="text/event-stream")
        ev = await wait_finish(request, handle, queue, "/v1/completions")
        count("/v1/completions", 200)
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "text": ev.text or "", "logprobs": None,
                             "finish_reason": _finish_reason(ev.finish_reason)}],
                "usage": usage(ev)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        authorize(request)
        check_model(body.model)
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so it cannot serve chat")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = tokenize(lambda: tokenizer.apply_chat_template(messages), "messages")
        ids = tokenize(lambda: tokenizer.encode(text, add_special_tokens=False), "messages")
        req = engine_request(body, ids, body.max_completion_tokens or body.max_tokens)
        handle, queue = await run(request, req)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(request, handle, queue, chunk, include, "/v1/chat/completions"),
                                     media_type="text/event-stream")
        ev = await wait_finish(request, handle, queue, "/v1/chat/completions")
        count("/v1/chat/completions", 200)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ev.text or ""},
                             "logprobs": None, "finish_reason": _finish_reason(ev.finish_reason)}],
                "usage": usage(ev)}

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "moeinfer"}]}

    @app.get("/health")
    async def health() -> Any:
        masked = faults.masked()
        status = "draining" if state["draining"] else ("degraded" if masked else "ok")
        body = {"status": status, "masked_experts": [{"layer": l, "expert": e} for l, e in masked],
                "running": engine.stats.running, "waiting": engine.stats.waiting}
        return JSONResponse(body, status_code=503 if state["draining"] else 200)

    @app.get("/metrics")
    async def prometheus(request: Request) -> PlainTextResponse:
        authorize(request, admin=True)
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        authorize(request, admin=True)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Any:
        authorize(request, admin=True)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="moeinfer API")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> Any:
        authorize(request, admin=True)
        return get_redoc_html(openapi_url="/openapi.json", title="moeinfer API")

    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes, on_reject=count)
    app.add_middleware(ErrorShield, on_error=count)
    return app


KNOWN_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
                         "/docs", "/redoc", "/openapi.json"})
