"""`moeinfer placement`: compute an expert placement offline from a routing trace, write it as JSON.

  moeinfer placement --trace trace.npz --ranks 4 --strategy replicated --out placement.json
  moeinfer placement --trace trace.npz --ranks 4 --model CKPT --budget-gib 0.01 --out placement.json
  torchrun --nproc-per-node 4 -m moeinfer generate -m CKPT --expert-parallel 4 --placement placement.json

Prints, for every strategy, the load imbalance (max / mean tokens per rank) it gives on the trace;
with --simulate, also the simulator's all-to-all bytes, imbalance per step and times on a cluster
profile (moeinfer.parallel.simulator; its assumptions are listed there and in docs/expert-parallel.md):

  moeinfer placement --trace trace.npz --ranks 64 --simulate --cluster h100-nvlink-ib400 --shape deepseek-v3
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
    p.add_argument("--smoothing", type=float, default=None,
                   help="shrink the trace's expert loads toward their layer mean by this share before placing "
                        "(default 0.25: traces are short and popularity drifts; 0 fits the trace exactly)")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="memory budget per rank for routed experts (GiB); needs --model to size an expert; "
                        "sets --slots-per-rank")
    p.add_argument("--model", "-m", default=None,
                   help="checkpoint directory or shipped model name: checks the trace fits it and sizes experts")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per expert weight for --budget-gib (default 2)")
    p.add_argument("--out", "-o", default=None, help="placement file to write (.json)")
    p.add_argument("--simulate", action="store_true", help="also predict bytes, imbalance and time per strategy")
    p.add_argument("--cluster", default="h100-nvlink-ib400", help="cluster profile for --simulate")
    p.add_argument("--shape", default=None,
                   help="model shape for --simulate (mixtral-8x7b, qwen3-30b-a3b, deepseek-v3; default: from "
                        "--model, else mixtral-8x7b's hidden sizes with the trace's experts)")
    p.add_argument("--tokens-per-rank", type=int, default=128, help="tokens each rank brings per step (--simulate)")
    p.set_defaults(func=run)


def _model_slots(args: argparse.Namespace, prof) -> int | None:
    """Check the trace against the model's config; turn --budget-gib into experts per rank."""
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.models import resolve_model_path
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


def _simulate(args: argparse.Namespace, prof, placements: dict) -> None:
    from dataclasses import replace

    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.model.shape import SHAPES, ModelShape
    from moeinfer.parallel.simulator import get_cluster, simulate

    if prof.indices is None:
        raise ValueError(f"--simulate needs token-level routing; {args.trace} holds per-expert loads only")
    cluster = get_cluster(args.cluster)
    if args.shape is not None:
        if args.shape not in SHAPES:
            raise ValueError(f"model shape {args.shape!r} is not known; valid: {', '.join(sorted(SHAPES))}")
        shape = SHAPES[args.shape]
    elif args.model is not None:
        # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
        from moeinfer.models import resolve_model_path
        from moeinfer.arch import parse_config
        from moeinfer.loading.checkpoint import read_config

        mc = parse_config(read_config(resolve_model_path(args.model)))
        shape = ModelShape.from_config(mc, str(args.model), dtype_bytes=args.dtype_bytes)
    else:
        shape = replace(SHAPES["mixtral-8x7b"], num_experts=prof.num_experts, top_k=prof.top_k)
    print(f"\nsimulated on {cluster.name} ({cluster.ranks_per_node} ranks/node), {shape.name} shape "
          f"(D={shape.hidden}, I={shape.inter}), {args.tokens_per_rank} tokens/rank/step:")
    print(f"{'strategy':<12} {'imb/step':>8} {'KiB/tok/layer':>13} {'inter-node':>10} {'a2a us':>7} "
          f"{'experts us':>10} {'layer us':>8} {'TBO us':>7} {'dedup saves':>11}")
    for name, plc in placements.items():
        kw = dict(shape=shape, cluster=cluster, tokens_per_rank=args.tokens_per_rank)
        r = simulate(prof.indices, prof.layers, plc, dedup=True, **kw)
        plain = simulate(prof.indices, prof.layers, plc, dedup=False, **kw)
        saved = 1 - r.bytes_per_token / plain.bytes_per_token if plain.bytes_per_token else 0.0
        print(f"{name:<12} {r.imbalance:>8.3f} {r.bytes_per_token / 1024:>13.1f} {100 * r.inter_fraction:>9.0f}% "
              f"{r.a2a_us:>7.0f} {r.expert_us:>10.0f} {r.step_us:>8.0f} {r.step_overlap_us:>7.0f} "
              f"{100 * saved:>10.1f}%")


def run(args: argparse.Namespace) -> int:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
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
    placements = {}
    for name in sorted(STRATEGIES):
        slots = args.slots_per_rank if name == "replicated" else None
        smooth = {} if args.smoothing is None else {"smoothing": args.smoothing}
        plc = make_placement(name, num_ranks=args.ranks, num_experts=prof.num_experts, layers=prof.layers,
                             load=load, slots_per_rank=slots, info={"trace": str(args.trace)}, **smooth)
        per_layer = [imbalance(plc.rank_load(layer, load[i])) for i, layer in enumerate(prof.layers)]
        mark = " *" if name == args.strategy else ""
        print(f"{name:<12} {plc.max_slots():>9} {sum(per_layer) / len(per_layer):>29.3f} {max(per_layer):>12.3f}{mark}")
        placements[name] = plc
        if name == args.strategy:
            chosen = plc
    assert chosen is not None
    if args.simulate:
        _simulate(args, prof, placements)
    if args.out:
        path = chosen.save(args.out)
        print(f"wrote {path} ({args.strategy}, {args.ranks} ranks)", file=sys.stderr)
    return 0
