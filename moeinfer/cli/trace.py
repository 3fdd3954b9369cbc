"""`moeinfer trace`: record, summarize and convert expert-routing traces (format: docs/traces.md).

  moeinfer trace -m MODEL --prompts FILE --out trace.npz   generate with routing recorded; write the
                                                           trace and print its summary
  moeinfer trace summary trace.npz                         print a saved trace's summary
  moeinfer trace convert-mixtral F.jsonl --out trace.npz   convert the public Mixtral-8x7B traces
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.cli import add_model_args

    p = sub.add_parser("trace", help="record, summarize and convert expert-routing traces", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompts", "-p", default=None,
                   help="prompt file: one prompt per line (.txt), or .jsonl lines with a 'prompt' "
                        "(text, token ids or chat messages)")
    p.add_argument("--out", "-o", default=None, help="where to write the trace (.npz)")
    p.add_argument("--max-new-tokens", "-n", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate() batch (default: 8)")
    p.add_argument("--no-logits", action="store_true", help="do not store router logits (smaller file)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)
    tsub = p.add_subparsers(dest="trace_command", metavar="{summary,convert-mixtral}")

    s = tsub.add_parser("summary", help="print the summary statistics of a saved trace",
                        description="Print a saved trace's statistics: tokens per expert, load imbalance, "
                                    "entropy and consecutive-token expert reuse (formulas: docs/traces.md).")
    s.add_argument("file", help="trace file (.npz) written by `moeinfer trace` or convert-mixtral")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=run_summary)

    c = tsub.add_parser("convert-mixtral", help="convert the public Mixtral-8x7B routing jsonl to a trace",
                        description="Convert Mixtral-8x7B-Instruct routing traces (jsonl lines with dataset, "
                                    "problem_id, layer, experts, gating_probs, token_idx) into a trace file; "
                                    "tokens missing a layer are dropped.")
    c.add_argument("jsonl", nargs="+", help="routing jsonl file(s), e.g. humaneval_2_routing.jsonl")
    c.add_argument("--out", "-o", required=True, help="trace file to write (.npz)")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    c.set_defaults(func=run_convert)


def read_prompts(path: str) -> list[Any]:
    """Prompts of a .txt file (one per non-empty line) or a .jsonl file ({"prompt": ...} per line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p}: no such file")
    prompts: list[Any] = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), (str, list)):
                raise ValueError(f"{p}:{n}: expected an object with a 'prompt' (text, token ids or messages)")
            prompts.append(row["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompt file {p} has no prompts")
    return prompts


def _print_summary(trace: Any, as_json: bool) -> None:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.traces.stats import format_summary, summarize

    s = summarize(trace)
    print(json.dumps(s, indent=1) if as_json else format_summary(s))


def run(args: argparse.Namespace) -> int:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.cli import load_model
    from moeinfer.engine.generate import generate
    from moeinfer.traces.trace import RoutingRecorder

    if args.prompts is None or args.out is None:
        raise ValueError("recording needs --prompts FILE and --out FILE "
                         "(or use `moeinfer trace summary FILE` / `moeinfer trace convert-mixtral JSONL`)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = read_prompts(args.prompts)
    model = load_model(args)
    rec = RoutingRecorder(model, logits=not args.no_logits,
                          meta={"model": str(args.model), "prompts_file": str(args.prompts),
                                "max_new_tokens": args.max_new_tokens})
    rec.attach()
    try:
        for i in range(0, len(prompts), args.batch_size):
            generate(model, prompts[i:i + args.batch_size], max_new_tokens=args.max_new_tokens)
    finally:
        rec.detach()
    trace = rec.trace()
    path = trace.save(args.out)
    print(f"wrote {path}: {trace.num_tokens} tokens x {trace.num_layers} MoE layers", file=sys.stderr)
    _print_summary(trace, args.json)
    return 0


def run_summary(args: argparse.Namespace) -> int:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.traces.trace import RoutingTrace

    _print_summary(RoutingTrace.load(args.file), args.json)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.traces.convert import convert_mixtral

    trace = convert_mixtral(args.jsonl)
    path = trace.save(args.out)
    print(f"wrote {path}: {trace.num_tokens} tokens x {trace.num_layers} MoE layers", file=sys.stderr)
    _print_summary(trace, args.json)
    return 0
