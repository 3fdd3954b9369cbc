"""`moeinfer simulate`: replay a routing trace through the expert cache, policies and prefetchers.

  moeinfer simulate --trace t.npz --shape mixtral-8x7b --cache 4 --scope layer --policy lru,lfu,belady
  moeinfer simulate --trace humaneval_2_routing.jsonl --calibration gsm8k.npz --prefetch transition
  moeinfer simulate --calibrate [--out this-machine.json]        measure this machine's profile

The decisions are the live runtime's own (moeinfer.offload.simulator); the clock comes from a
hardware profile (--hardware: a shipped name or a JSON file). Belady reads the trace's own future.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate expert offloading on a routing trace", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", "-t", nargs="+", default=None,
                   help="routing trace (.npz), or the Mixtral-8x7B routing .jsonl file(s) (converted on the fly)")
    p.add_argument("--shape", default=None,
                   help="model shape: a preset (mixtral-8x7b) or a checkpoint folder/shipped model name "
                        "(default: mixtral-8x7b for Mixtral traces)")
    p.add_argument("--cache", default="4", help="expert cache: a count or bytes, e.g. 4 or 24GB (default: 4)")
    p.add_argument("--scope", default="layer", choices=["global", "layer"], help="(default: layer)")
    p.add_argument("--policy", default="lru", help="cache policy, or a comma-separated list to compare")
    p.add_argument("--prefetch", default="none", help="prefetcher, or a comma-separated list")
    p.add_argument("--calibration", default=None, help="calibration trace (.npz or Mixtral .jsonl)")
    p.add_argument("--hardware", default="h100-pcie5", help="hardware profile name or JSON file")
    p.add_argument("--cpu-assist", action="store_true", help="compute missing experts on the CPU when cheaper")
    p.add_argument("--low-bit", type=float, default=None, metavar="THRESHOLD",
                   help="mixed precision: fetch a 4-bit copy when the gate weight is below THRESHOLD")
    p.add_argument("--no-overlap", action="store_true", help="on-demand baseline: loads never overlap compute")
    p.add_argument("--calibrate", action="store_true", help="measure this machine and print/write its profile")
    p.add_argument("--out", default=None, help="with --calibrate: write the profile JSON here")
    p.add_argument("--calibrate-mib", type=int, default=128, help="with --calibrate: MiB read and copied (default: 128)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=run)


def read_trace(paths: list[str]) -> Any:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.traces.trace import RoutingTrace
    from moeinfer.traces.convert import convert_mixtral

    if all(p.endswith(".jsonl") for p in paths):
        return convert_mixtral(paths)
    if len(paths) != 1:
        raise ValueError(f"give one .npz trace or Mixtral .jsonl files, got {paths}")
    return RoutingTrace.load(paths[0])


def resolve_shape(name: str | None, trace: Any) -> Any:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.offload.hardware import SHAPES, shape_from_checkpoint

    if name is None:
        if str(trace.meta.get("model", "")).startswith("mistralai/Mixtral-8x7B"):
            return SHAPES["mixtral-8x7b"]
        if trace.meta.get("model"):
            return shape_from_checkpoint(trace.meta["model"])
        raise ValueError("the trace does not name its model: give --shape (a preset or a checkpoint)")
    if name in SHAPES:
        return SHAPES[name]
    return shape_from_checkpoint(name)


def run(args: argparse.Namespace) -> int:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.offload.hardware import calibrate, load_profile

    if args.calibrate:
        prof = calibrate(mib=args.calibrate_mib)
        if args.out:
            prof.save(args.out)
        print(json.dumps(prof.__dict__, indent=2, default=str))
        return 0
    if not args.trace:
        raise ValueError("--trace is required (or --calibrate)")
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.offload.config import OffloadConfig
    from moeinfer.offload.simulator import simulate

    trace = read_trace(args.trace)
    calib = read_trace([args.calibration]) if args.calibration else None
    shape = resolve_shape(args.shape, trace)
    hw = load_profile(args.hardware)
    results = []
    for policy in args.policy.split(","):
        for prefetch in args.prefetch.split(","):
            cfg = OffloadConfig(tier="cpu", cache=args.cache, scope=args.scope, policy=policy, prefetch=prefetch,
                                calibration=calib, future=trace if policy == "belady" else None,
                                cpu_assist=args.cpu_assist, low_bit_threshold=args.low_bit)
            results.append(simulate(trace, shape=shape, config=cfg, hardware=hw, overlap=not args.no_overlap))
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
        return 0
    print(f"trace: {trace.num_tokens} tokens, {trace.num_layers} MoE layers x {trace.num_experts} experts, "
          f"top-{trace.top_k}; shape {shape.name} ({shape.expert_bytes / 2**20:.1f} MiB/expert); "
          f"hardware {hw.name}; cache {args.cache} ({args.scope})")
    print(f"{'policy':<17}{'prefetch':<12}{'hit rate':>9}{'GB moved':>10}{'stall s':>9}{'tok/s':>9}"
          f"{'bound tok/s':>12}{'precision':>10}{'recall':>8}")
    for r in results:
        c = r.cache
        bound = r.tokens / r.link_bound_s if r.link_bound_s else float("inf")
        prec = f"{c['precision']:.3f}" if c["precision"] is not None else "-"
        rec = f"{c['recall']:.3f}" if c["recall"] is not None else "-"
        print(f"{r.settings['policy']:<17}{r.settings['prefetch']:<12}{r.hit_rate:>9.3f}{r.bytes_moved / 1e9:>10.2f}"
              f"{r.stall_s:>9.3f}{r.tokens_per_s:>9.2f}{bound:>12.2f}{prec:>10}{rec:>8}")
    return 0
