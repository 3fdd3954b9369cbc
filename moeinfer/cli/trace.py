"""`moeinfer trace`: run prompts from a file with routing recorded; write the trace and its summary."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="record routing traces (not yet available)", description=__doc__)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise ValueError("trace is being implemented")
