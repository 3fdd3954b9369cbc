"""`moeinfer serve` against the official `openai` client, over real HTTP on loopback."""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

import moeinfer
from hf_peers import save_hf_checkpoint
from serve_helpers import MODEL, Server
from serve_helpers import free_port as _free_port
from tiny_tokenizer import write_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve")
    save_hf_checkpoint("mixtral", path, vocab_size=300, eos_token_id=1, num_local_experts=8)
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return moeinfer.load(ckpt, progress=False)


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--max-batch", "8", "--max-queue", "64")
    yield s
    s.stop()


def _alone(model, prompt, n, **kw):
    return moeinfer.generate(model, [prompt], max_new_tokens=n, **kw)[0]


def test_models(server):
    assert [m.id for m in server.client().models.list().data] == [MODEL]


def test_completion_equals_engine(server, model):
    r = server.client().completions.create(model=MODEL, prompt="to be or", max_tokens=12, temperature=0)
    ref = _alone(model, "to be or", 12)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)


def test_token_id_prompt(server, model):
    r = server.client().completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=5, temperature=0)
    assert r.choices[0].text == _alone(model, [5, 6, 7], 5).text


def test_chat_equals_engine(server, model):
    messages = [{"role": "user", "content": "whether 'tis nobler"}]
    r = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _alone(model, messages, 10).text


def test_streaming_matches_non_streaming(server):
    c = server.client()
    full = c.completions.create(model=MODEL, prompt="the slings", max_tokens=16, temperature=0)
    stream = c.completions.create(model=MODEL, prompt="the slings", max_tokens=16, temperature=0, stream=True,
                                  stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_streaming(server):
    c = server.client()
    messages = [{"role": "system", "content": "brief"}, {"role": "user", "content": "to be"}]
    full = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full.choices[0].message.content


def test_stop_sequence(server, model):
    free = _alone(model, "to be", 24, ignore_eos=True).text
    stop = free[3:5]
    r = server.client().completions.create(model=MODEL, prompt="to be", max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == free[: free.index(stop)]


def test_seeded_sampling_is_reproducible(server):
    c = server.client()
    a = c.completions.create(model=MODEL, prompt="to", max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    b = c.completions.create(model=MODEL, prompt="to", max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert a.choices[0].text == b.choices[0].text


@pytest.mark.parametrize("kwargs,error", [
    (dict(model="nope", prompt="x"), openai.NotFoundError),
    (dict(model=MODEL, prompt="x", n=2), openai.BadRequestError),
    (dict(model=MODEL, prompt="x", temperature=5.0), openai.BadRequestError),
    (dict(model=MODEL, prompt="x", max_tokens=0), openai.BadRequestError),
    (dict(model=MODEL, prompt="x", max_tokens=100000), openai.BadRequestError),
    (dict(model=MODEL, prompt="to be " * 400), openai.BadRequestError),
    (dict(model=MODEL, prompt=""), openai.BadRequestError),
    (dict(model=MODEL, prompt=["a", "b"]), openai.BadRequestError),
    (dict(model=MODEL, prompt=[5, 9999]), openai.BadRequestError),
    (dict(model=MODEL, prompt="x", logprobs=2), openai.BadRequestError),
])
def test_errors_surface_as_client_exceptions(server, kwargs, error):
    with pytest.raises(error) as e:
        server.client().completions.create(**kwargs)
    body = e.value.body
    assert isinstance(body, dict) and body.get("message")


def test_chat_errors(server):
    with pytest.raises(openai.BadRequestError, match="messages"):
        server.client().chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"model": 5, "prompt": "x"}',
                                  b'{"model": "tiny-test", "prompt": {"a": 1}}', b'{"model": "tiny-test"}'])
def test_malformed_bodies_get_400(server, body):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_body_size_limit(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x" * (2 << 20)})
    assert r.status_code == 413
    assert "exceeds" in r.json()["error"]["message"]


def test_concurrent_streams_equal_their_solo_outputs(server, model):
    """32 streaming requests at once through continuous batching; each equals its solo output (greedy)."""
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    prompts = [" ".join(words[i % 7: i % 7 + 1 + i % 5]) for i in range(32)]
    lengths = [4 + (i * 7) % 20 for i in range(32)]

    def run(i):
        stream = server.client().completions.create(model=MODEL, prompt=prompts[i], max_tokens=lengths[i],
                                                    temperature=0, stream=True)
        return "".join(ch.choices[0].text for ch in stream if ch.choices)

    with cf.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(run, range(32)))
    for i in range(32):
        assert got[i] == _alone(model, prompts[i], lengths[i]).text, f"request {i}"


def _running(server) -> int:
    return httpx.get(server.url + "/health").json()["running"]


def test_client_disconnect_frees_the_slot(server):
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"model": MODEL, "prompt": "to", "max_tokens": 200, "stream": True,
                            "temperature": 0}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 20
    while _running(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _running(server) == 0


def test_metrics(server):
    server.client().completions.create(model=MODEL, prompt="to be", max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("moeinfer_requests_total", "moeinfer_time_to_first_token_seconds_bucket",
                 "moeinfer_time_per_output_token_seconds_count", "moeinfer_tokens_per_second",
                 "moeinfer_batch_size", 'moeinfer_expert_tokens_total{expert="0",layer="0"}',
                 "moeinfer_degraded_tokens_total"):
        assert name in text, name


def test_api_key(ckpt):
    s = Server(ckpt, env={"MOEINFER_API_KEY": "sekret"})
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("sekret").models.list().data[0].id == MODEL
    finally:
        s.stop()


def test_full_queue_returns_429(ckpt):
    s = Server(ckpt, "--max-batch", "1", "--max-queue", "1")
    try:
        def fire(_):
            return httpx.post(s.url + "/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": "to", "max_tokens": 60, "temperature": 0})

        with cf.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(fire, range(8)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes
        limited = next(r for r in responses if r.status_code == 429)
        assert limited.headers["retry-after"] == "1"
        assert limited.json()["error"]["type"] == "rate_limit_error"
    finally:
        s.stop()


def test_expert_fault_degrades_gracefully(ckpt):
    s = Server(ckpt, "--inject-expert-fault", "0:3", "--inject-expert-fault", "1:5")
    try:
        health = httpx.get(s.url + "/health").json()
        assert health["status"] == "degraded"
        assert health["masked_experts"] == [{"layer": 0, "expert": 3}, {"layer": 1, "expert": 5}]
        for p in ("to be", "or not to be", "whether tis nobler in the mind"):
            r = s.client().completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0)
            assert r.choices[0].finish_reason in ("length", "stop")
        metrics = httpx.get(s.url + "/metrics").text
        degraded = float(next(line.split()[-1] for line in metrics.splitlines()
                              if line.startswith("moeinfer_degraded_tokens_total")))
        assert degraded > 0
        load = [line for line in metrics.splitlines() if line.startswith("moeinfer_expert_tokens_total")]
        assert any('expert="3",layer="0"} 0.0' in line for line in load)
    finally:
        s.stop()


def test_sigterm_finishes_in_flight_then_exits_0(ckpt):
    s = Server(ckpt, "--shutdown-timeout", "20")
    with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "to", "max_tokens": 40, "stream": True,
                            "temperature": 0}) as r:
        lines = r.iter_lines()
        first = next(lines)
        s.proc.send_signal(signal.SIGTERM)
        rest = [first, *lines]
    assert rest[-1] == "data: [DONE]" or "[DONE]" in "".join(rest)
    assert s.proc.wait(timeout=30) == 0


@pytest.mark.distributed
def test_serving_under_expert_parallelism(ckpt, model):
    """torchrun, 2 gloo ranks: rank 0 serves, rank 1 replays its forwards; outputs equal one process."""
    port, master = _free_port(), _free_port()
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.Popen(
        [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(master),
         "-m", "moeinfer", "serve", "--model", str(ckpt), "--served-model-name", MODEL, "--port", str(port),
         "--expert-parallel", "2", "--inject-expert-fault", "1:2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        masked = moeinfer.load(ckpt, progress=False)
        masked.moe_blocks()[1].gate.mask_expert(2)
        for prompt, n in (("to be or", 10), ("whether tis nobler in the mind", 6)):
            r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
            assert r.choices[0].text == _alone(masked, prompt, n).text
        assert httpx.get(url + "/health").json()["status"] == "degraded"
    finally:
        # torchrun forwards SIGTERM to its workers and then exits 1 by its own rule (SignalException);
        # what matters here is that rank 0 drains, stops its follower, and nothing hangs.
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
