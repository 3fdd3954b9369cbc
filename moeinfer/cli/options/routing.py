"""--routing: dynamic gating mode of the loaded model's routers (moeinfer.model.gating).

    moeinfer eval --model tiny --routing top-p:0.7
    moeinfer generate --model tiny --routing threshold:0.3

Without the flag a checkpoint keeps the mode it was saved with (config.json `moeinfer_routing`);
`--routing default` turns that off.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--routing", default=None, metavar="MODE",
                   help="dynamic gating: top-k:K, top-p:P, threshold:T (x top-1 weight), entropy:H, each "
                        "optionally :MAX_K; 'default' = the model's top-k (default: the checkpoint's mode)")


def apply_(model: Any, args: argparse.Namespace) -> Any:
    if getattr(args, "routing", None) is None:
        return model
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.model.gating import set_routing_

    return set_routing_(model, args.routing)
