"""The server as a careless user or an attacker meets it (issue 14): every error OpenAI-shaped, invalid
text a 400 on a connection that stays usable, tiny temperatures greedy, disconnects cancel at once,
an empty API key refused, metrics behind the key, draining visible and streams ended with a word."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import moeinfer
from serve_helpers import MODEL, RawHTTP, Server, ThreadServer, assert_openai_error, make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve_robust"))


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--max-batch", "4")
    yield s
    s.stop()


def _body(**kw) -> bytes:
    return json.dumps({"model": MODEL, **kw}).encode()


def _greedy_text(server, prompt="to be", n=6) -> str:
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": n,
                                                          "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


# -- defect 2: tiny temperature / top_p are greedy; NaN and Infinity are refused ---------------------
@pytest.mark.parametrize("sampling", [{"temperature": 1e-300}, {"temperature": 1e-40},
                                      {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 5e-324}])
def test_tiny_temperature_or_top_p_answers_greedily(server, sampling):
    greedy = _greedy_text(server)
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "to be", "max_tokens": 6, **sampling})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy


@pytest.mark.parametrize("raw", [b'"temperature": NaN', b'"temperature": Infinity', b'"top_p": NaN',
                                 b'"temperature": -1e-300', b'"top_p": -Infinity'])
def test_non_finite_sampling_values_are_400(server, raw):
    body = b'{"model": "%s", "prompt": "to", "max_tokens": 2, %s}' % (MODEL.encode(), raw)
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = assert_openai_error(r.json())
    assert ("temperature" in err["message"]) or ("top_p" in err["message"])


# -- defect 3: invalid text is a 400 and the keep-alive connection still serves ------------------------
@pytest.mark.parametrize("path,body", [
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "a\\ud800"}'),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": ["\\udfff x"]}'),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "ok", "stop": ["\\ud800"]}'),
    ("/v1/completions", b'{"model": "tiny-\\ud800", "prompt": "ok"}'),
    ("/v1/chat/completions", b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi \\udc00"}]}'),
    ("/v1/chat/completions",
     b'{"model": "tiny-test", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}'),
])
def test_lone_surrogates_are_400_and_the_connection_stays_usable(server, path, body):
    conn = RawHTTP(server.port)
    try:
        status, headers, got = conn.request("POST", path, body)
        assert status == 400, got
        err = assert_openai_error(got)
        assert "Unicode" in err["message"] and err["type"] == "invalid_request_error"
        assert headers.get("connection") != "close"
        status, _, ok = conn.request("POST", "/v1/completions", _body(prompt="to be", max_tokens=3, temperature=0))
        assert status == 200 and ok["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        conn.close()


def test_paired_surrogates_are_valid_text(server):
    body = b'{"model": "tiny-test", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


# -- defect 7: every error has the OpenAI shape ---------------------------------------------------------
DEEP = b"[" * 100_000 + b"]" * 100_000
ERROR_CASES = {
    "invalid utf-8": ("POST", "/v1/completions", b'{"model": "tiny-test", "prompt": "\xff\xfe\xc3"}', 400),
    "5000-digit int": ("POST", "/v1/completions", b'{"model": "tiny-test", "prompt": "x", "max_tokens": '
                       + b"9" * 5000 + b"}", 400),
    "deep nesting": ("POST", "/v1/completions", b'{"model": "tiny-test", "prompt": ' + DEEP + b"}", 400),
    "deep nesting at the top": ("POST", "/v1/completions", DEEP, 400),
    "nesting under the recursion limit": ("POST", "/v1/chat/completions",
                                          b'{"model": "tiny-test", "messages": ' + b"[" * 900 + b"]" * 900 + b"}",
                                          400),
    "not json": ("POST", "/v1/completions", b"{not json", 400),
    "empty body": ("POST", "/v1/completions", b"", 400),
    "wrong type": ("POST", "/v1/chat/completions", b'{"model": "tiny-test", "messages": "hi"}', 400),
    "huge stop list": ("POST", "/v1/completions", _body(prompt="x", stop=["s"] * 10_000), 400),
    "unknown route": ("GET", "/v1/nope", b"", 404),
    "unknown route, post": ("POST", "/admin", b"{}", 404),
    "wrong method": ("GET", "/v1/completions", b"", 405),
    "wrong method on health": ("DELETE", "/health", b"", 405),
    "unknown model": ("POST", "/v1/completions", _body(prompt="x"), None),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_every_error_is_openai_shaped(server, case):
    method, path, body, status = ERROR_CASES[case]
    if case == "unknown model":
        body, status = json.dumps({"model": "nope", "prompt": "x"}).encode(), 404
    conn = RawHTTP(server.port)
    try:
        got_status, headers, got = conn.request(method, path, body)
        assert got_status == status, got
        assert headers["content-type"].startswith("application/json")
        assert_openai_error(got)
        if status == 405:
            assert "allow" in headers
        status, _, ok = conn.request("GET", "/v1/models")  # the same connection still serves
        assert status == 200 and ok["data"][0]["id"] == MODEL
    finally:
        conn.close()


def test_an_unexpected_error_is_a_500_on_a_connection_that_stays_usable():
    """ErrorShield: what no handler expected still gets an OpenAI-shaped 500, and keep-alive survives
    (starlette's own last handler re-raises, and uvicorn then drops the connection)."""
    from fastapi import FastAPI

    from moeinfer.serve.middleware import ErrorShield

    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/boom")
    async def boom():
        raise TypeError("a bug")

    app.add_middleware(ErrorShield)
    server = ThreadServer(app)
    conn = RawHTTP(server.port)
    try:
        status, headers, got = conn.request("GET", "/boom")
        assert status == 500 and assert_openai_error(got)["message"] == "internal error: TypeError"
        assert conn.request("GET", "/health")[0] == 200
    finally:
        conn.close()
        server.stop()


def test_chunked_body_over_the_limit_is_413(server):
    conn = RawHTTP(server.port)  # the default limit: 1 MiB
    conn.send("POST", "/v1/completions", chunks=[b'{"model": "tiny-test", "prompt": "' + b"x" * 65536] * 20)
    status, _, raw = conn.response()
    conn.close()
    assert status == 413
    assert "exceeds 1048576 bytes" in assert_openai_error(json.loads(raw))["message"]
    small = RawHTTP(server.port)  # a chunked body under the limit is read whole and served
    small.send("POST", "/v1/completions", chunks=[b'{"model": "tiny-test", ', b'"prompt": "to", "max_tokens": 2}'])
    status, _, raw = small.response()
    small.close()
    assert status == 200, raw


# -- defect 4: a disconnected client's request is cancelled within one engine step ---------------------
@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_cancels_within_one_engine_step(ckpt, stream):
    from moeinfer.engine.batching import BatchEngine, FinishEvent
    from moeinfer.serve.app import create_app

    model = moeinfer.load(ckpt, progress=False)
    engine = BatchEngine(model, max_batch=2).start()
    forward = engine.ops.forward

    def slow_forward(*args):  # steps of >= 50 ms: the server has time to notice within one step
        time.sleep(0.05)
        return forward(*args)

    engine.ops.forward = slow_forward
    ended: list[tuple[str, int]] = []
    ended_event = threading.Event()
    submit = engine.submit

    def watched_submit(req, on_event):
        def spy(ev):
            if isinstance(ev, FinishEvent):
                ended.append((ev.finish_reason, engine.stats.steps))
                ended_event.set()
            on_event(ev)
        return submit(req, spy)

    engine.submit = watched_submit
    server = ThreadServer(create_app(engine, model_name=MODEL, shutdown_timeout=0))
    try:
        conn = RawHTTP(server.port)
        conn.send("POST", "/v1/completions", _body(prompt="to be", max_tokens=200, temperature=0, stream=stream))
        deadline = time.monotonic() + 60
        while engine.stats.tokens_generated < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats.tokens_generated >= 3
        closed_at = engine.stats.steps
        conn.close()
        assert ended_event.wait(30)
        reason, step = ended[0]
        assert reason == "cancelled"
        assert step - closed_at <= 2, f"cancelled {step - closed_at} engine steps after the client left"
    finally:
        server.stop()


# -- defect 5: an empty API key is an error; metrics and docs need the key unless --public-metrics -----
@pytest.mark.parametrize("how", ["flag", "env", "blank flag", "blank env"])
def test_empty_api_key_is_refused(ckpt, how, monkeypatch, capsys):
    import moeinfer.serve.server as server_mod
    from moeinfer.cli import main

    def must_not_serve(model, cfg, **kw):
        raise AssertionError(f"started serving with api_key={cfg.api_key!r}")

    monkeypatch.setattr(server_mod, "serve", must_not_serve)
    monkeypatch.delenv("MOEINFER_API_KEY", raising=False)
    args = ["serve", "--model", str(ckpt)]
    if how in ("flag", "blank flag"):
        args += ["--api-key", "" if how == "flag" else "  "]
    else:
        monkeypatch.setenv("MOEINFER_API_KEY", "" if how == "env" else " ")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "is empty" in err and ("--api-key" if "flag" in how else "MOEINFER_API_KEY") in err


def test_empty_api_key_on_the_command_line_is_one_line(ckpt):
    env = {k: v for k, v in os.environ.items() if k != "MOEINFER_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "moeinfer", "serve", "--model", str(ckpt), "--port", "0",
                             "--api-key", ""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:  # it started serving without authentication
        proc.kill()
        proc.communicate()
        pytest.fail("--api-key '' started a server without authentication")
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("moeinfer serve: error: --api-key is empty")


PROTECTED = ["/metrics", "/docs", "/redoc", "/openapi.json"]


def test_metrics_and_docs_need_the_key(ckpt):
    s = Server(ckpt, "--api-key", "sekret")
    try:
        for path in [*PROTECTED, "/v1/models"]:
            r = httpx.get(s.url + path)
            assert r.status_code == 401, path
            assert assert_openai_error(r.json())["type"] == "authentication_error"
            assert httpx.get(s.url + path, headers={"authorization": "Bearer sekret"}).status_code == 200, path
        assert httpx.get(s.url + "/health").status_code == 200
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 401
    finally:
        s.stop()


def test_public_metrics_opens_metrics_and_docs_only(ckpt):
    s = Server(ckpt, "--api-key", "sekret", "--public-metrics")
    try:
        for path in PROTECTED:
            assert httpx.get(s.url + path).status_code == 200, path
        assert "moeinfer_requests_total" in httpx.get(s.url + "/metrics").text
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
    finally:
        s.stop()


# -- defect 8: draining is visible, streams cut at the deadline end with an error chunk and [DONE] -----
def _stream_lines(url, n, lines, started):
    with httpx.stream("POST", url + "/v1/completions", timeout=120,
                      json={"model": MODEL, "prompt": "to", "max_tokens": n, "stream": True, "temperature": 0}) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)
                started.set()


def test_shutdown_deadline_ends_streams_with_error_and_done(ckpt):
    s = Server(ckpt, "--shutdown-timeout", "0")
    lines: list[str] = []
    started = threading.Event()
    t = threading.Thread(target=_stream_lines, args=(s.url, 240, lines, started))
    t.start()
    assert started.wait(60)
    s.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert s.proc.wait(timeout=60) == 0
    assert lines[-1] == "data: [DONE]", lines[-3:]
    err = assert_openai_error(json.loads(lines[-2].removeprefix("data: ")))
    assert "shut down" in err["message"] and err["code"] == "server_shutdown"
    log = s.log()
    assert "Traceback" not in log and "CancelledError" not in log, log


def test_health_reports_draining_while_draining(ckpt):
    s = Server(ckpt, "--shutdown-timeout", "60", "--max-batch", "1")
    results: list[list[str]] = [[], [], []]
    started = [threading.Event() for _ in results]
    threads = [threading.Thread(target=_stream_lines, args=(s.url, 240, results[i], started[i])) for i in range(3)]
    for t in threads:  # started together: one runs, two queue behind it (each takes 240 steps), so all
        t.start()      # three are seen before the first ends even on a loaded machine
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        h = httpx.get(s.url + "/health").json()
        if h["running"] + h["waiting"] == 3:
            break
        time.sleep(0.01)
    assert h["running"] == 1 and h["waiting"] == 2, h
    s.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    health = None
    while time.monotonic() < deadline:  # the signal is handled asynchronously
        health = httpx.get(s.url + "/health", timeout=10)
        if health.status_code == 503:
            break
        time.sleep(0.02)
    assert health is not None and health.status_code == 503 and health.json()["status"] == "draining"
    r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "to", "max_tokens": 2}, timeout=10)
    assert r.status_code == 503 and "shutting down" in assert_openai_error(r.json())["message"]
    for t in threads:
        t.join(120)
    assert s.proc.wait(timeout=60) == 0
    for lines in results:  # accepted before the signal: all finish normally
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] in ("length", "stop")
    assert "Traceback" not in s.log()


# -- defect 11: --deterministic reaches the engine ------------------------------------------------------
def test_deterministic_flag_reaches_the_engine(ckpt):
    from moeinfer.cli import build_parser
    from moeinfer.serve.server import ServeConfig, build_app

    args = build_parser().parse_args(["serve", "--model", str(ckpt), "--deterministic"])
    assert args.deterministic
    model = moeinfer.load(ckpt, progress=False)
    app = build_app(model, ServeConfig(model_name=MODEL, deterministic=True))
    try:
        assert app.state.engine.deterministic
    finally:
        app.state.engine.stop(0)
