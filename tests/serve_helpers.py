"""Starting `moeinfer serve` for tests: as a subprocess (real CLI, signals) or in this process on a
thread (to reach into the engine), plus a raw HTTP/1.1 client for what httpx hides (keep-alive reuse,
chunked bodies, invalid bytes)."""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai

MODEL = "tiny-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, alive: Any, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"server did not start in {timeout} s")


class Server:
    """`python -m moeinfer serve` in a subprocess; its output goes to a file (a pipe nobody reads
    would fill up and block the server), readable with `log()`."""

    def __init__(self, ckpt: Path, *extra: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logfile = tempfile.NamedTemporaryFile("w+", prefix="moeinfer-serve-", suffix=".log", delete=False)
        atexit.register(os.unlink, self.logfile.name)  # readable after stop(), gone with the test process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moeinfer", "serve", "--model", str(ckpt), "--served-model-name", MODEL,
             "--port", str(self.port), *extra],
            stdout=self.logfile, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})

        def alive() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log()}")

        try:
            wait_healthy(self.url, alive)
        except RuntimeError:
            self.stop()
            raise

    def log(self) -> str:
        return Path(self.logfile.name).read_text(errors="replace")

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class ThreadServer:
    """The app of `create_app` under uvicorn on a thread of this process: tests can reach its engine."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_healthy(self.url, lambda: None)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class RawHTTP:
    """One keep-alive HTTP/1.1 connection, bytes in and out."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.buf = b""

    def send(self, method: str, path: str, body: bytes = b"", *, headers: dict[str, str] | None = None,
             chunks: list[bytes] | None = None) -> None:
        head = {"host": "127.0.0.1", "content-type": "application/json", **(headers or {})}
        if chunks is not None:
            head["transfer-encoding"] = "chunked"
        else:
            head["content-length"] = str(len(body))
        data = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(
            f"{k}: {v}\r\n".encode() for k, v in head.items()) + b"\r\n"
        if chunks is None:
            self.sock.sendall(data + body)
            return
        self.sock.sendall(data)
        try:
            for c in chunks:
                self.sock.sendall(f"{len(c):x}\r\n".encode() + c + b"\r\n")
            self.sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered (413) and closed while we were still sending
            pass

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"connection closed; got {self.buf[:200]!r}")
            self.buf += data
        out, self.buf = self.buf.split(marker, 1)
        return out

    def _read_n(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed mid-body")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self) -> tuple[int, dict[str, str], bytes]:
        head = self._read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:])}
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self._read_until(b"\r\n"), 16)
                if size == 0:
                    self._read_until(b"\r\n")
                    return status, headers, body
                body += self._read_n(size)
                self._read_n(2)
        return status, headers, self._read_n(int(headers.get("content-length", "0")))

    def request(self, method: str, path: str, body: bytes = b"", **kw: Any) -> tuple[int, dict[str, str], Any]:
        self.send(method, path, body, **kw)
        status, headers, raw = self.response()
        return status, headers, json.loads(raw) if headers.get("content-type", "").startswith("application/json") \
            else raw

    def close(self) -> None:
        self.sock.close()


def assert_openai_error(body: Any, status: int | None = None) -> dict:
    """`body` is {"error": {"message": str, "type": str, "param", "code"}} and nothing else."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"], body
    assert isinstance(err.get("type"), str) and {"param", "code"} <= set(err), body
    return err


def make_checkpoint(path: Path) -> Path:
    """The small mixtral checkpoint with a tokenizer that the server tests serve."""
    from hf_peers import save_hf_checkpoint
    from tiny_tokenizer import write_tokenizer

    save_hf_checkpoint("mixtral", path, vocab_size=300, eos_token_id=1, num_local_experts=8)
    write_tokenizer(path)
    return path
