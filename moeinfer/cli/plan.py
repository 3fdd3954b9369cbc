"""`moeinfer plan`: choose expert precision, placement, caching and kernel for a memory budget.

  moeinfer plan --model tiny --memory 30MB
  moeinfer plan --model DIR --memory 8GB --max-quality-loss 1% --objective throughput --out plan.yaml
  moeinfer generate --plan plan.yaml "Once upon a time"      (or --plan auto: plan for the free memory)

Costs come from a measured profile of this machine (cached after the first run) and the offload
simulator; quality from measured output error mapped to bits per byte (docs/planner.md).
"""

from __future__ import annotations

import argparse


def _fraction(text: str) -> float:
    t = text.strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction (0.01) or a percentage (1%)") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.cli import DEFAULT_MODEL

    p = sub.add_parser("plan", help="choose precision, placement and caching for a memory budget",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"checkpoint folder or shipped model (default: {DEFAULT_MODEL})")
    p.add_argument("--memory", required=True, help="memory budget, e.g. 8GB, 512MB")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: cpu)")
    p.add_argument("--max-quality-loss", type=_fraction, default=0.01,
                   help="largest predicted bits-per-byte increase, e.g. 1%% or 0.01 (default: 1%%)")
    p.add_argument("--objective", default="latency", choices=["latency", "throughput"], help="(default: latency)")
    p.add_argument("--trace", default=None, help="routing trace (.npz) to price routing with")
    p.add_argument("--calibration", default=None,
                   help="text for quality and routing: a dataset name or file (default: english)")
    p.add_argument("--precisions", default="bf16,int8,int4",
                   help="expert precisions to consider: bf16 and quantize presets (default: bf16,int8,int4)")
    p.add_argument("--quality-from", default=None, metavar="MODEL",
                   help="a model whose measured quality loss stands in when --model is too big to measure "
                        "(e.g. a smaller model of the same family); without it such a model gets bf16 plans only")
    p.add_argument("--refresh-profile", action="store_true", help="measure this machine again")
    p.add_argument("--no-probe", action="store_true",
                   help="predict from the cached profile as it is (default: scaled by the machine's speed on the "
                        "model's shape now, a probe of a few seconds; ~20 s on a Mixtral-8x7B shape)")
    p.add_argument("--out", "-o", default=None, help="write the plan here (YAML); an existing file needs --force")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.planning.planner import plan
    from moeinfer.planning.report import format_plan

    if args.out and Path(args.out).exists() and not args.force:
        raise ValueError(f"{args.out} exists; pass --force to overwrite it")
    if args.refresh_profile:
        # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
        from moeinfer.planning.profile import machine_profile

        machine_profile(args.device, refresh=True, progress=True)
    result = plan(args.model, args.memory, device=args.device, max_quality_loss=args.max_quality_loss,
                  objective=args.objective, trace=args.trace, calibration=args.calibration,
                  precisions=tuple(p.strip() for p in args.precisions.split(",") if p.strip()),
                  quality_from=args.quality_from, probe=not args.no_probe, progress=True)
    print(format_plan(result))
    if args.out:
        print(f"wrote {result.save(args.out)}")
    return 0
