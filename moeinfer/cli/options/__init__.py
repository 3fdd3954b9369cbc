"""Run-time options every model-loading subcommand takes (kernel, routing mode, offloading, ...).

Each concern lives in its own module here with two functions: `add_args(parser)` and
`apply_(model, args) -> model` (applied in order right after loading). Register new ones in OPTIONS.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

OPTIONS: list[str] = ["kernel", "routing", "offload", "plan"]


def add_args(p: argparse.ArgumentParser) -> None:
    for name in OPTIONS:
        importlib.import_module(f"moeinfer.cli.options.{name}").add_args(p)


def apply_(model: Any, args: argparse.Namespace) -> Any:
    for name in OPTIONS:
        model = importlib.import_module(f"moeinfer.cli.options.{name}").apply_(model, args)
    return model
