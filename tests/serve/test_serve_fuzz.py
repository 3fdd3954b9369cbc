"""Fuzzing the HTTP server (issue 14): hypothesis bodies over the request schemas, in which any field
may instead hold a poison value (tiny/huge/NaN floats, lone surrogates, 5000-digit integers, deep
nesting, huge stop lists, wrong types) or be missing, plus hand-written raw bodies (invalid UTF-8,
truncated JSON, ...). For every body: no 5xx; an error is OpenAI-shaped; a 200 is a well-formed
completion or a stream that ends with `[DONE]`. Meanwhile a healthy request runs again and again and
must always get the same answer, and afterwards the server still serves.

Bounded for the default run: FUZZ_EXAMPLES (env MOEINFER_FUZZ_EXAMPLES, default 150) bodies per
endpoint, derandomized so that CI runs the same bodies every time. The figures (bodies tried, status
codes seen) are printed at the end.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_helpers import MODEL, Server, assert_openai_error, make_checkpoint

FUZZ_EXAMPLES = int(os.environ.get("MOEINFER_FUZZ_EXAMPLES", "150"))
FIGURES: Counter = Counter()  # (phase, status) -> bodies

# -- poison values, as raw JSON text (some cannot be written by json.dumps: NaN, deep nesting) -------
POISON = [
    # floats: tiny, subnormal, huge, overflowing, non-finite, negative zero
    "1e-300", "1e-40", "5e-324", "-1e-300", "1.7976931348623157e308", "1e400", "-1e400", "NaN", "Infinity",
    "-Infinity", "-0.0", "0.0",
    # integers: beyond every limit, and the usual edges
    "9" * 5000, "-" + "9" * 5000, str(2**63), str(-(2**63) - 1), str(10**30), "-1", "0",
    # text: lone surrogates, NUL, huge, empty, a valid pair
    '"a\\ud800"', '"\\udfff"', '"x\\udc00y"', '"\\u0000"', '"' + "x" * 20000 + '"', '""', '"\\ud83d\\ude00"',
    # nesting: beyond and under the parser's recursion limit
    "[" * 3000 + "]" * 3000, '{"a":' * 3000 + "1" + "}" * 3000, "[" * 600 + "]" * 600,
    # lists: huge stop lists, mixed types, surrogates inside
    json.dumps(["s"] * 1000), json.dumps(["stop"] * 5), '["\\ud800", "ok"]', '[1, "a", null, {}, []]',
    json.dumps(list(range(5000))), json.dumps([[1, 2], [3]]), json.dumps([10**6, -5]),
    # wrong types everywhere
    "null", "true", "false", "{}", "[]", '{"role": "user"}', '"1.0"', '"true"', '"tiny-test"',
    '[{"type": "image_url", "image_url": "x"}]', '{"include_usage": "maybe"}',
]


def poison() -> st.SearchStrategy[str]:
    return st.sampled_from(POISON)


def valid(strategy: st.SearchStrategy) -> st.SearchStrategy[str]:
    return strategy.map(json.dumps)


TEXT = st.text(max_size=24)
SAMPLING = {
    "model": valid(st.just(MODEL)),
    "max_tokens": valid(st.integers(1, 8)),
    "temperature": valid(st.floats(0, 2, allow_nan=False)),
    "top_p": valid(st.floats(0, 1, exclude_min=True, allow_nan=False)),
    "n": valid(st.just(1)),
    "stream": valid(st.booleans()),
    "stream_options": valid(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "stop": valid(st.none() | st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=4)),
    "seed": valid(st.none() | st.integers(-(2**63), 2**63 - 1)),
    "logprobs": valid(st.none() | st.just(False)),
    "user": valid(TEXT),
}
COMPLETION = {**SAMPLING,
              "prompt": valid(st.text(min_size=1, max_size=24) | st.lists(st.integers(0, 299), min_size=1, max_size=8)
                              | st.lists(st.text(min_size=1, max_size=24), min_size=1, max_size=2)
                              | st.lists(st.lists(st.integers(0, 299), min_size=1, max_size=5), min_size=1,
                                         max_size=2)),
              "echo": valid(st.just(False))}
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard"]),
     "content": st.none() | TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                                            max_size=2)})
CHAT = {**SAMPLING, "messages": valid(st.lists(MESSAGE, min_size=1, max_size=3)),
        "max_completion_tokens": valid(st.integers(1, 8))}


REQUIRED = ("model", "prompt", "messages", "max_tokens")  # max_tokens: the default 16 is over --max-tokens 8


@st.composite
def body(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[str]]) -> bytes:
    """A JSON object over a subset of `fields` (the required ones present 9 times in 10); each field
    valid, or poisoned 1 time in 8, so that both valid requests and every kind of error are seen."""
    names = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=len(fields)))
    # (hypothesis favours small integers: 0 is the common, valid case)
    names += [n for n in REQUIRED if n in fields and n not in names and draw(st.integers(0, 9)) < 9]
    parts = []
    for name in names:
        value = draw(poison()) if draw(st.integers(0, 7)) == 7 else draw(fields[name])
        parts.append(f"{json.dumps(name)}: {value}")
    if draw(st.booleans()):  # an unknown field: ignored, whatever it holds
        parts.append(f'"x_extra": {draw(poison())}')
    return ("{" + ", ".join(parts) + "}").encode()


RAW_BODIES = [
    b'{"model": "tiny-test", "prompt": "\xff\xfe\xc3"}', b"\xef\xbb\xbf{}", b"\x00\x01\x02", b"{", b'{"model": ',
    b"[]", b'"just a string"', b"null", b"12", b"9" * 5000, b"[" * 100000 + b"]" * 100000, b"", b"   ",
    b'{"model": "tiny-test", "model": 5, "prompt": "x"}', b'{"' + b"k" * 100000 + b'": 1}',
    b'{"model": "tiny-test", "prompt": "to", "max_tokens": 2, "temperature": 1e-300}',
    b'{"model": "tiny-test", "prompt": "to", "max_tokens": 2, "top_p": 1e-300, "temperature": 1}',
    b'{"model": "tiny-test", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "tiny-test", "prompt": "\\ud800\\ud800", "stream": true}',
]
ODD_REQUESTS = [("GET", "/v1/completions"), ("PUT", "/v1/chat/completions"), ("DELETE", "/v1/models"),
                ("GET", "/v1/nope"), ("POST", "/v2/completions"), ("GET", "/" + "a" * 5000), ("PATCH", "/health")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(make_checkpoint(tmp_path_factory.mktemp("fuzz")), "--max-batch", "4", "--max-tokens", "8")
    yield s
    s.stop()
    assert "Traceback" not in s.log(), s.log()[-4000:]


class Healthy:
    """A valid request sent over and over on its own thread; every answer must equal the first."""

    BODY = {"model": MODEL, "prompt": "to be or not", "max_tokens": 8, "temperature": 0}

    def __init__(self, url: str) -> None:
        self.url, self.answers, self.bad = url, 0, []
        self.reference = httpx.post(url + "/v1/completions", json=self.BODY, timeout=60).json()["choices"][0]["text"]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.stop.is_set():
                stream = self.answers % 2 == 1
                r = c.post("/v1/completions", json={**self.BODY, "stream": stream})
                text = (_stream_text(r.text) if stream else r.json()["choices"][0]["text"]) \
                    if r.status_code == 200 else None
                if text != self.reference:
                    self.bad.append((r.status_code, r.text[:300]))
                self.answers += 1

    def __enter__(self) -> Healthy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(120)
        assert not self.bad, f"healthy requests were hurt: {self.bad[:3]}"
        assert self.answers > 0


def _stream_text(raw: str) -> str:
    data = [line.removeprefix("data: ") for line in raw.splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", raw[-300:]
    chunks = [json.loads(d) for d in data[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))


def check(r: httpx.Response, phase: str, sent: bytes | None = None) -> None:
    FIGURES[(phase, r.status_code)] += 1
    assert r.status_code < 500, (sent[:300] if sent else None, r.text[:500])
    if r.status_code >= 400:
        assert_openai_error(r.json())
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        data = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]", r.text[-300:]
        for d in data[:-1]:
            chunk = json.loads(d)
            assert "choices" in chunk or "error" in chunk, chunk
            if "error" in chunk:
                assert_openai_error(chunk)
        return
    got = r.json()
    assert got["choices"][0]["finish_reason"] in ("length", "stop") and got["usage"]["completion_tokens"] <= 8


_SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("path,fields", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_fuzzed_bodies(server, path, fields):
    with Healthy(server.url), httpx.Client(base_url=server.url, timeout=60) as client:
        @_SETTINGS
        @given(body(fields))
        def one(b: bytes) -> None:
            check(client.post(path, content=b, headers={"content-type": "application/json"}), path, b)

        one()


def test_raw_bodies_and_odd_requests(server):
    with Healthy(server.url), httpx.Client(base_url=server.url, timeout=60) as client:
        for path in ("/v1/completions", "/v1/chat/completions"):
            for b in RAW_BODIES:
                check(client.post(path, content=b, headers={"content-type": "application/json"}), "raw", b)
        for method, path in ODD_REQUESTS:
            check(client.request(method, path), "odd")


BASE = {"/v1/completions": {"model": MODEL, "prompt": "to be", "max_tokens": 4},
        "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "to be"}], "max_tokens": 4}}


def test_poison_in_parallel_with_healthy_requests(server):
    """Every poison value in every field of a valid request, 4 at a time, while the healthy request
    keeps running."""
    bodies = []
    for path, fields in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        for name in fields:
            for v in POISON:
                rest = ", ".join(f"{json.dumps(k)}: {json.dumps(x)}" for k, x in BASE[path].items() if k != name)
                bodies.append((path, ("{" + rest + f", {json.dumps(name)}: {v}" + "}").encode()))
    local = threading.local()

    def send(item):
        path, b = item
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=server.url, timeout=60)
        return b, local.client.post(path, content=b, headers={"content-type": "application/json"})

    with Healthy(server.url), cf.ThreadPoolExecutor(4) as pool:
        for b, r in pool.map(send, bodies):
            check(r, "parallel", b)


def test_the_server_still_serves_and_the_figures(server, capsys):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["running"] == 0 and h["waiting"] == 0
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "to be"}], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    total = sum(FIGURES.values())
    by_status = Counter()
    for (_, status), n in FIGURES.items():
        by_status[status] += n
    with capsys.disabled():
        print(f"\nserver fuzz: {total} requests; status codes: {dict(sorted(by_status.items()))}; by phase: "
              + "; ".join(f"{p} {s}: {n}" for (p, s), n in sorted(FIGURES.items())))
    assert not [s for s in by_status if s >= 500]
