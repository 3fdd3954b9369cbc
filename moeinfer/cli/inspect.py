"""`moeinfer inspect`: architecture, parameter counts (total / active per token), bytes by component,
experts and top-k per layer."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.cli import add_model_args

    p = sub.add_parser("inspect", help="describe a checkpoint", description=__doc__)
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.cli import load_model
    from moeinfer.model.summary import summarize

    model = load_model(args)
    info = summarize(model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    gib = 1024**2
    print(f"model          {args.model}")
    print(f"architecture   {info['model_type']}  ({info['attention']} attention, {info['num_layers']} layers, "
          f"hidden {info['hidden_size']}, vocab {info['vocab_size']})")
    print(f"parameters     {info['params_total']:,} total, {info['params_active']:,} active per token "
          f"({100 * info['params_active'] / info['params_total']:.1f}%)")
    print(f"dtype          {info['dtype']}")
    print("bytes          " + ", ".join(f"{k} {v / gib:.2f} MiB" for k, v in info["bytes"].items()))
    print("layers")
    for row in info["layers"]:
        ffn = (f"MoE {row['experts']} experts, top-{row['top_k']}, expert inner {row['expert_inner']}"
               + (f", shared inner {row['shared_inner']}" if row["shared_inner"] else "")
               if row["ffn"] == "moe" else f"dense inner {row['dense_inner']}")
        print(f"  {row['layer']:>3}  {ffn}")
    return 0
