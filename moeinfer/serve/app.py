"""The FastAPI application: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

Requests become `EngineRequest`s on the continuous-batching engine's thread; its events come back
to the event loop through a per-request asyncio queue and are sent as one JSON body or as
server-sent events (`data: {...}` chunks, then `data: [DONE]`) exactly as OpenAI clients expect.
A client that disconnects cancels its request, which frees its batch slot at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from moeinfer.engine.batching import BatchEngine, EngineRequest, ErrorEvent, FinishEvent, QueueFull, TokenEvent
from moeinfer.engine.faults import ExpertFaults, ExpertLoad
from moeinfer.engine.sampling import SamplingParams
from moeinfer.serve.errors import APIError, error_body, error_response
from moeinfer.serve.metrics import ServerMetrics
from moeinfer.serve.schemas import ChatCompletionRequest, CompletionRequest


@dataclass
class ServerLimits:
    """Bounds on what one request may ask for."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # default: the engine's context - 1
    max_tokens: int | None = None  # default: the engine's context
    retry_after_s: int = 1


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over the limit, declared or streamed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = JSONResponse(error_body(413, f"request body exceeds {self.max_bytes} bytes"), status_code=413)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise APIError(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        return await self.app(scope, limited_receive, send)


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def create_app(engine: BatchEngine, *, model_name: str, api_key: str | None = None,
               limits: ServerLimits | None = None, faults: Any = None, expert_load: Any = None,
               shutdown_timeout: float = 10.0) -> FastAPI:
    """Build the app around a started engine. `faults`/`expert_load` feed /health and /metrics.
    On shutdown the engine finishes in-flight requests for up to `shutdown_timeout` seconds."""
    limits = limits or ServerLimits()
    faults = faults or ExpertFaults(engine.model)
    expert_load = expert_load if expert_load is not None else ExpertLoad(engine.model)
    metrics = ServerMetrics(engine, expert_load.counts, faults)
    tokenizer = engine.model.tokenizer
    max_prompt = limits.max_prompt_tokens or engine.max_context - 1
    max_tokens_cap = limits.max_tokens or engine.max_context
    state = {"draining": False}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state["draining"] = True
        await asyncio.to_thread(engine.stop, shutdown_timeout)

    app = FastAPI(title="moeinfer", version="1", summary="OpenAI-compatible MoE inference server",
                  lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.faults, app.state.state = engine, metrics, faults, state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"{loc}: {first.get('msg')}" if loc else str(first.get("msg", "invalid request"))
        metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(400, message, param=loc), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        metrics.requests.labels(request.url.path, "500").inc()
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
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
            raise APIError(400, str(e)) from e
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
            raise APIError(429, str(e), headers={"Retry-After": str(limits.retry_after_s)}) from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        return handle, queue

    async def wait_finish(request: Request, handle: Any, queue: asyncio.Queue) -> FinishEvent:
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    handle.cancel()
                    raise APIError(400, "client disconnected") from None
                continue
            if isinstance(ev, FinishEvent):
                metrics.observe_finish(ev)
                return ev
            if isinstance(ev, ErrorEvent):
                raise APIError(500, ev.message)

    def usage(ev: FinishEvent) -> dict[str, int]:
        n = len(ev.token_ids)
        return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": n, "total_tokens": ev.prompt_tokens + n}

    async def sse(request: Request, handle: Any, queue: asyncio.Queue, chunk: Any, include_usage: bool,
                  endpoint: str) -> AsyncIterator[str]:
        done = False
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
                    done = True
                    metrics.requests.labels(endpoint, "200").inc()
                    return
                elif isinstance(ev, ErrorEvent):
                    yield f"data: {json.dumps(error_body(500, ev.message))}\n\n"
                    done = True
                    return
        finally:
            if not done:  # client went away: free the batch slot
                handle.cancel()

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
            ids = tokenizer.encode(prompt)
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
        ev = await wait_finish(request, handle, queue)
        metrics.requests.labels("/v1/completions", "200").inc()
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
        try:
            text = tokenizer.apply_chat_template(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        ids = tokenizer.encode(text, add_special_tokens=False)
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
        ev = await wait_finish(request, handle, queue)
        metrics.requests.labels("/v1/chat/completions", "200").inc()
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
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    return app
