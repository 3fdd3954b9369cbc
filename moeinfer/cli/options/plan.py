"""--plan: apply a plan (`moeinfer plan --out plan.yaml`) to the loaded model, or plan one now ("auto":
for the memory free on the device, at most 1% quality loss)."""

from __future__ import annotations

import argparse
from typing import Any


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", default=None, metavar="PLAN",
                   help="plan.yaml from `moeinfer plan`, or 'auto' to plan for the free memory (docs/planner.md)")


def apply_(model: Any, args: argparse.Namespace) -> Any:
    if not getattr(args, "plan", None) or getattr(model, "plan", None) is not None:
        return model  # no plan, or loaded straight into it (moeinfer.cli.load_model: load_planned)
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.planning import apply_plan_
    from moeinfer.planning.spec import Plan, PlanError

    if getattr(args, "offload", None):
        raise PlanError("--plan sets the offload settings itself: drop --offload")
    if args.plan == "auto":
        # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
        from moeinfer.compress.api import weight_bytes
        from moeinfer.planning.planner import plan
        from moeinfer.planning.sizes import available_memory

        device = "cuda" if str(args.device).startswith("cuda") else "cpu"

        # planned from the checkpoint (its quality measurement is cached), for what is free plus what the
        # loaded model already holds
        chosen = plan(args.model, available_memory(device) + weight_bytes(model), device=device)
    else:
        chosen = Plan.load(args.plan)
    return apply_plan_(model, chosen, progress=True)
