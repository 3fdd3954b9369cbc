"""Running the app under uvicorn, with graceful shutdown.

On SIGTERM (or SIGINT) the server drains before uvicorn is told to exit: /health answers 503
"draining" (so a load balancer takes the server out), new requests get 503, in-flight requests
finish for up to `shutdown_timeout` seconds, and the ones still running then end with an error
(a stream gets an error chunk and `[DONE]`). Only then does uvicorn close the connections, which by
then are idle, so no task is cancelled mid-response. A second signal exits at once. Exit code 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

from moeinfer.engine.batching import BatchEngine, make_cache
from moeinfer.engine.faults import ExpertFaults, ExpertLoad
from moeinfer.engine.lockstep import follow
from moeinfer.model.transformer import MoEModel
from moeinfer.serve.app import ServerLimits, create_app

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    prefill_chunk: int = 256
    max_model_len: int | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    expert_faults: list[tuple[int, int]] = field(default_factory=list)
    shutdown_timeout: float = 10.0
    public_metrics: bool = False  # /metrics and the API docs answer without the key
    deterministic: bool = False  # a request's tokens do not depend on the batch (one forward per row)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key must not be empty (an unset variable in --api-key \"$KEY\"?); "
                             "leave it out to serve without a key")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")


def inject_faults(model: MoEModel, cfg: ServeConfig) -> ExpertFaults:
    faults = ExpertFaults(model)
    for layer, expert in cfg.expert_faults:
        faults.mask(layer, expert, reason="injected with --inject-expert-fault")
    return faults


def build_app(model: MoEModel, cfg: ServeConfig, *, ops: Any = None):  # noqa: ANN201
    """The app and its started engine; `ops` (e.g. LeaderOps under expert parallelism) runs the model."""
    faults = inject_faults(model, cfg)
    engine = BatchEngine(model, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                         prefill_chunk=cfg.prefill_chunk, max_context=cfg.max_model_len, ops=ops,
                         deterministic=cfg.deterministic).start()
    return create_app(engine, model_name=cfg.model_name, api_key=cfg.api_key, limits=cfg.limits, faults=faults,
                      expert_load=ExpertLoad(model), shutdown_timeout=cfg.shutdown_timeout,
                      public_metrics=cfg.public_metrics)


def serve(model: MoEModel, cfg: ServeConfig, *, ops: Any = None) -> int:
    import uvicorn

    app = build_app(model, cfg, ops=ops)

    class Server(uvicorn.Server):
        """Drains the app on the first signal, then exits (module doc). uvicorn re-raises SIGTERM after
        its own shutdown (the process then dies of the signal); we only ask for the graceful exit, so a
        drained server exits 0."""

        draining: threading.Thread | None = None

        @contextlib.contextmanager
        def capture_signals(self):  # noqa: ANN202
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.draining is not None:  # a second signal: stop now
                self.should_exit = self.force_exit = True
                return

            def drain_then_exit() -> None:
                try:
                    app.state.drain(cfg.shutdown_timeout)
                finally:
                    self.should_exit = True

            self.draining = threading.Thread(target=drain_then_exit, name="moeinfer-drain", daemon=True)
            self.draining.start()

    # The drain already ended every request; uvicorn's own grace period only covers slow writes.
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=5)
    Server(config).run()
    return 0


def follow_leader(model: MoEModel, cfg: ServeConfig, group: Any) -> int:
    """Ranks other than 0 under expert parallelism: mirror rank 0's engine until it stops.
    SIGTERM is ignored here: rank 0 drains its requests, then tells the followers to stop."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inject_faults(model, cfg)
    follow(model, make_cache(model, max_batch=cfg.max_batch, max_context=cfg.max_model_len), group)
    return 0
