"""`moeinfer placement`: compute an expert placement offline from a routing trace, write it as JSON.

  moeinfer placement --trace trace.npz --ranks 4 --strategy replicated --out placement.json
  moeinfer placement --trace trace.npz --ranks 4 --model CKPT --budget-gib 0.01 --out placement.json
  torchrun --nproc-per-node 4 -m moeinfer generate -m CKPT --expert-parallel 4 --placement placement.json

Prints, for every strategy, the load imbalance (max / mean tokens per rank) it gives on the trace.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("placement", help="compute an expert placement from a routing trace",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", "-t", required=True,
                   help="routing trace (.npz from `moeinfer trace`), Mixtral routing jsonl (file or folder), "
                        "or a profile .json")
    p.add_argument("--ranks", "-r", type=int, required=True, help="number of expert-parallel ranks")
    p.add_argument("--strategy", "-s", default="replicated",
                   help="contiguous, round_robin, balanced or replicated (default: replicated)")
    p.add_argument("--slots-per-rank", type=int, default=None,
                   help="memory budget: experts per rank and layer (replicated; default ceil(E/ranks)+1)")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="memory budget per rank for routed experts (GiB); needs --model to size an expert; "
                        "sets --slots-per-rank")
    p.add_argument("--model", "-m", default=None,
                   help="checkpoint directory or shipped model name: checks the trace fits it and sizes experts")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per expert weight for --budget-gib (default 2)")
    p.add_argument("--out", "-o", default=None, help="placement file to write (.json)")
    p.set_defaults(func=run)


def _model_slots(args: argparse.Namespace, prof) -> int | None:
    """Check the trace against the model's config; turn --budget-gib into experts per rank."""
    from moeinfer.api import resolve_model_path
    from moeinfer.arch import parse_config
    from moeinfer.loading.checkpoint import read_config
    from moeinfer.parallel.placement import slots_for_budget

    mc = parse_config(read_config(resolve_model_path(args.model)))
    if mc.num_experts != prof.num_experts or len(mc.moe_layers) != len(prof.layers):
        raise ValueError(f"trace {args.trace} ({prof.num_experts} experts, {len(prof.layers)} MoE layers) does not "
                         f"match {args.model} ({mc.num_experts} experts, {len(mc.moe_layers)} MoE layers)")
    if args.budget_gib is None:
        return args.slots_per_rank
    expert_bytes = 3 * mc.hidden_size * mc.moe_intermediate_size * args.dtype_bytes
    slots = slots_for_budget(int(args.budget_gib * 2**30), expert_bytes=expert_bytes, num_layers=len(mc.moe_layers))
    print(f"budget {args.budget_gib} GiB per rank = {slots} expert(s) per rank and layer "
          f"({expert_bytes / 2**20:.3g} MiB per expert, {len(mc.moe_layers)} MoE layers)")
    return slots


def run(args: argparse.Namespace) -> int:
    from moeinfer.parallel.placement import STRATEGIES, get_strategy, imbalance, make_placement
    from moeinfer.parallel.profile import read_profile

    get_strategy(args.strategy)  # a bad name lists the valid ones
    if args.budget_gib is not None and args.model is None:
        raise ValueError("--budget-gib needs --model to know the size of an expert")
    if args.ranks < 1:
        raise ValueError(f"--ranks must be >= 1, got {args.ranks}")
    prof = read_profile(args.trace)
    load = prof.load()  # [L, E]
    if args.model is not None:
        args.slots_per_rank = _model_slots(args, prof)
    print(f"trace {args.trace}: {prof.num_tokens or 'load-only'} tokens, {len(prof.layers)} MoE layers, "
          f"{prof.num_experts} experts")
    print(f"{'strategy':<12} {'max slots':>9} {'imbalance (mean over layers)':>29} {'worst layer':>12}")
    chosen = None
    for name in sorted(STRATEGIES):
        slots = args.slots_per_rank if name == "replicated" else None
        plc = make_placement(name, num_ranks=args.ranks, num_experts=prof.num_experts, layers=prof.layers,
                             load=load, slots_per_rank=slots, info={"trace": str(args.trace)})
        per_layer = [imbalance(plc.rank_load(layer, load[i])) for i, layer in enumerate(prof.layers)]
        mark = " *" if name == args.strategy else ""
        print(f"{name:<12} {plc.max_slots():>9} {sum(per_layer) / len(per_layer):>29.3f} {max(per_layer):>12.3f}{mark}")
        if name == args.strategy:
            chosen = plc
    assert chosen is not None
    if args.out:
        path = chosen.save(args.out)
        print(f"wrote {path} ({args.strategy}, {args.ranks} ranks)", file=sys.stderr)
    return 0
