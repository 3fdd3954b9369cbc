"""`moeinfer` command line: a thin shell over the Python API.

Each subcommand lives in its own module of this package with two functions:
`add_parser(subparsers)` and `run(args) -> int`. Register new ones in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = ["generate", "inspect", "init", "eval", "trace", "serve", "placement", "bench", "compress", "simulate",
               "plan", "export"]
DEFAULT_MODEL = "tiny"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeinfer", description="Fast, small and reliable MoE inference.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"moeinfer.cli.{name}")
        module.add_parser(sub)
    return parser


def _version() -> str:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer import __version__

    return f"moeinfer {__version__}"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model/--device/--dtype, shared by every subcommand that loads a model."""
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"checkpoint directory or shipped model name (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: the checkpoint's)")
    p.add_argument("--check-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="refuse weights holding NaN or Inf (default: on for serve, off otherwise)")
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.cli import options
    from moeinfer.parallel.launch import add_expert_parallel_args

    add_expert_parallel_args(p)
    options.add_args(p)


def load_model(args: argparse.Namespace):
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.api import load
    from moeinfer.parallel.launch import expert_parallel_config, secondary_rank_quiet_

    ep = expert_parallel_config(args)
    check = args.check_weights if getattr(args, "check_weights", None) is not None else args.command == "serve"
    if getattr(args, "plan", None) and ep is None and not getattr(args, "offload", None):
        # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
        from moeinfer.planning.load import load_planned

        # loaded straight into the plan: an offloading plan leaves the experts in the checkpoint
        model = load_planned(args.model, args.plan, device=args.device, dtype=args.dtype, check_weights=check)
    else:
        model = load(args.model, device=args.device, dtype=args.dtype, expert_parallel=ep,
                     on_expert_error=getattr(args, "on_expert_error", "raise"), check_weights=check)
    if ep is not None:
        secondary_rank_quiet_(args, model)  # rank 0 alone prints and writes files
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.cli import options

    return options.apply_(model, args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.config import ConfigError
    from moeinfer.loading.errors import CheckpointError

    try:
        if getattr(args, "device", None) is not None:
            # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
            from moeinfer.loading.devices import parse_device

            parse_device(args.device)  # before any work: a one-line error for banana, meta, cuda without CUDA
        return int(args.func(args) or 0)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"moeinfer {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
