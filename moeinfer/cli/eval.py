"""`moeinfer eval`: held-out bits per byte and perplexity of a model on shipped or user texts."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.cli import add_model_args
    from moeinfer.eval.datasets import DATASETS

    p = sub.add_parser("eval", help="bits per byte / perplexity on held-out text", description=__doc__)
    add_model_args(p)
    p.add_argument("data", nargs="*", default=list(DATASETS),
                   help=f"dataset names ({', '.join(DATASETS)}), text files or folders (default: all datasets)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per window (default: the model's max positions, at most 1024)")
    p.add_argument("--stride", type=int, default=None, help="tokens between windows (default: context / 2)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default: 8)")
    p.add_argument("--max-bytes", type=int, default=None, help="evaluate only the first N bytes of each text")
    p.add_argument("--json", action="store_true", help="print one JSON object per dataset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.cli import load_model
    from moeinfer.eval import evaluate
    from moeinfer.eval.datasets import DATASETS

    if args.dtype is None and str(args.device).startswith("cpu"):
        args.dtype = "float32"  # CPUs without bf16 matmul units run bf16 checkpoints far slower
    model = load_model(args)
    for item in args.data:
        target = item if item in DATASETS else Path(item)
        result = evaluate(model, target, context=args.context, stride=args.stride, batch_size=args.batch_size,
                          max_bytes=args.max_bytes, progress=not args.no_progress)
        print(json.dumps(result.to_dict()) if args.json else str(result), flush=True)
    return 0
