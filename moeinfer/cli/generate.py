"""`moeinfer generate`: complete a prompt or chat, streaming tokens to the terminal."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.cli import add_model_args

    p = sub.add_parser("generate", help="generate text from a prompt", description=__doc__)
    add_model_args(p)
    p.add_argument("prompt", nargs="?", default="The", help="prompt text (default: 'The')")
    p.add_argument("--chat", action="store_true", help="treat the prompt as a user message in the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-new-tokens", "-n", type=int, default=64)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--no-stream", action="store_true", help="print the result at the end only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.cli import load_model
    from moeinfer.engine.generate import generate
    from moeinfer.engine.sampling import SamplingParams

    # Bad sampling values (nan, inf, < 0) are a one-line error before the model loads.
    SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    model = load_model(args)
    prompt: object = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = messages + [{"role": "user", "content": args.prompt}]
    elif model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json: text prompts need one")

    def stream(_row: int, _token: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    if not args.chat:
        sys.stdout.write(args.prompt)
    [result] = generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                        on_token=None if args.no_stream else stream)
    if args.no_stream:
        sys.stdout.write(result.text or "")
    sys.stdout.write("\n")
    print(f"[{len(result.token_ids)} tokens, finish: {result.finish_reason}]", file=sys.stderr)
    return 0
