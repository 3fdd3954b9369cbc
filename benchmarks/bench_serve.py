"""Bounded load test of `moeinfer serve` on loopback: Poisson arrivals at several rates, continuous
batching versus one request at a time; writes a JSON file and the tables of docs/serving.md.

For each server setting (max batch B) and arrival rate r: start the server, send `--requests`
streaming completions whose send times follow a Poisson process of rate r (seeded), with prompts
cut from the shipped held-out English text, `--max-tokens` greedy tokens each; record TTFT, TPOT and
latency per request (moeinfer.bench.latency). Every run is bounded by the request count and by
`--timeout` seconds; the server binds 127.0.0.1 only.

    .venv/bin/python benchmarks/bench_serve.py --model tiny --rates 0.5 1 2 4 --requests 24
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from moeinfer.bench.latency import SLO, RequestTiming, summarize

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, seed: int, chars: int) -> list[str]:
    from moeinfer.eval.datasets import load_dataset

    text = load_dataset("english").text
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(text) - chars) for _ in range(n)]
    return [text[s:s + chars] for s in starts]


def start_server(model: str, port: int, max_batch: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moeinfer", "serve", "--model", model, "--port", str(port),
                             "--served-model-name", "bench", "--max-batch", str(max_batch), "--max-queue", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


async def one(client: httpx.AsyncClient, prompt: str, max_tokens: int, delay: float, t0: float) -> RequestTiming:
    await asyncio.sleep(delay)
    sent = time.perf_counter() - t0
    first, tokens = None, 0
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None:
                first = time.perf_counter() - t0
    done = time.perf_counter() - t0
    return RequestTiming(sent=sent, first_token=first if first is not None else done, done=done,
                         output_tokens=tokens)


async def load(port: int, texts: list[str], rate: float, max_tokens: int, seed: int, timeout: float):
    rng = random.Random(seed)
    delays, t = [], 0.0
    for _ in texts:
        t += rng.expovariate(rate)
        delays.append(t)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout) as client:
        tasks = [one(client, p, max_tokens, d, t0) for p, d in zip(texts, delays)]
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=timeout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 1], help="server --max-batch settings")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-chars", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="bound on one load run, seconds")
    ap.add_argument("--out", default=str(ROOT / "docs" / "serving-results.json"))
    args = ap.parse_args()

    texts = prompts(args.requests, args.seed, args.prompt_chars)
    slo = SLO()
    rows = []
    for batch in args.batches:
        port = free_port()
        proc = start_server(args.model, port, batch)
        try:
            for rate in args.rates:
                timings = asyncio.run(load(port, texts, rate, args.max_tokens, args.seed, args.timeout))
                s = summarize(timings, slo)
                rows.append({"max_batch": batch, "rate": rate, **s})
                print(f"batch {batch} rate {rate}/s: {s['throughput_tok_s']:.1f} tok/s, TTFT p50 "
                      f"{s['ttft_s']['p50']:.2f}s p99 {s['ttft_s']['p99']:.2f}s, TPOT p50 "
                      f"{s['tpot_s']['p50'] * 1000:.0f}ms, goodput {s['goodput_req_s']:.2f} req/s", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    import torch

    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": args.model,
            "device": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "requests_per_run": args.requests,
            "max_tokens": args.max_tokens, "prompt_chars": args.prompt_chars, "slo": vars(slo),
            "seed": args.seed}
    Path(args.out).write_text(json.dumps({"meta": meta, "runs": rows}, indent=2))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
