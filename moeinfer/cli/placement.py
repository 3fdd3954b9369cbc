"""`moeinfer placement`: compute an expert placement offline from a routing trace, write it as JSON.

  moeinfer placement --trace trace.npz --ranks 4 --strategy replicated --out placement.json
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
    p.add_argument("--out", "-o", default=None, help="placement file to write (.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moeinfer.parallel.placement import STRATEGIES, get_strategy, imbalance, make_placement
    from moeinfer.parallel.profile import read_profile

    get_strategy(args.strategy)  # a bad name lists the valid ones
    if args.ranks < 1:
        raise ValueError(f"--ranks must be >= 1, got {args.ranks}")
    prof = read_profile(args.trace)
    load = prof.load()  # [L, E]
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
