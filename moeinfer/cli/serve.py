"""`moeinfer serve`: an OpenAI-compatible HTTP server (completions, chat, streaming, metrics).

Binds 127.0.0.1 unless --host says otherwise. The API key comes from --api-key or the
MOEINFER_API_KEY environment variable; without one, requests need no key. An empty key is an error
(`--api-key "$KEY"` with KEY unset must not turn authentication off). With a key, /v1/* need it, and so
do /metrics and the API docs unless --public-metrics; /health is always open.
"""

from __future__ import annotations

import argparse
import os


def add_parser(sub: argparse._SubParsersAction) -> None:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.cli import add_model_args

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API", description=__doc__)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/*, /metrics and the docs (or MOEINFER_API_KEY)")
    p.add_argument("--public-metrics", action="store_true",
                   help="with a key: leave /metrics, /docs, /redoc and /openapi.json open")
    p.add_argument("--deterministic", action="store_true",
                   help="a request's tokens do not depend on the other requests in the batch, in bf16 too "
                        "(decodes each request in its own forward: lower throughput)")
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: --model)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV cache rows)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default: 64)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per step")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--inject-expert-fault", action="append", default=[], metavar="LAYER:EXPERT",
                   help="mask an expert as failed (repeatable), to test graceful degradation")
    p.add_argument("--on-expert-error", choices=["raise", "mask"], default="raise",
                   help="mask: serve a checkpoint whose routed experts fail to load, with them masked")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests may run after SIGTERM; then they end with an error")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.cli import load_model
    from moeinfer.engine.faults import parse_fault
    from moeinfer.serve.app import ServerLimits
    from moeinfer.serve.server import ServeConfig, follow_leader, serve

    api_key = args.api_key if args.api_key is not None else os.environ.get("MOEINFER_API_KEY")
    if api_key is not None and not api_key.strip():
        source = "--api-key" if args.api_key is not None else "MOEINFER_API_KEY"
        raise ValueError(f"{source} is empty (an unset variable?): give a key, or leave {source} out "
                         "to serve without one")
    cfg = ServeConfig(
        model_name=args.served_model_name or str(args.model), host=args.host, port=args.port,
        api_key=api_key, public_metrics=args.public_metrics, deterministic=args.deterministic,
        max_batch=args.max_batch,
        max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, max_model_len=args.max_model_len,
        limits=ServerLimits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens),
        expert_faults=[parse_fault(s) for s in args.inject_expert_fault], shutdown_timeout=args.shutdown_timeout)
    model = load_model(args)
    if not getattr(args, "expert_parallel", 0):
        return serve(model, cfg)
    # Expert parallelism: rank 0 serves; the other ranks replay its engine's forwards (lockstep).
    import functools

    import torch.distributed as dist

    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.engine.lockstep import LeaderOps

    group = dist.new_group(backend="gloo")  # object broadcasts, whatever the experts' backend
    if dist.get_rank() != 0:
        return follow_leader(model, cfg, group)
    return serve(model, cfg, ops=functools.partial(LeaderOps, group=group))
