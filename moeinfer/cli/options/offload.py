"""Offloading options of every model-loading subcommand: `--offload --expert-cache 24GB ...`.

`apply_` offloads the loaded model (`moeinfer.offload_`) and, with `--replay-trace`, forces its routing
from a trace (`moeinfer.offload.replay_routing_`).
"""

from __future__ import annotations

import argparse
from typing import Any

from moeinfer.fsutil import scratch_dir


def add_args(p: argparse.ArgumentParser) -> None:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.offload.policies import POLICIES
    from moeinfer.offload.prefetch import PREFETCHERS

    g = p.add_argument_group("expert offloading (docs/offloading.md)")
    g.add_argument("--offload", nargs="?", const="disk", default=None, choices=["disk", "cpu"],
                   help="keep experts in a slow tier (disk: default; cpu: host memory) with a cache in fast memory")
    g.add_argument("--expert-cache", default="8", metavar="SIZE",
                   help="fast-tier expert cache: an expert count (8) or bytes (24GB, 512MB) (default: 8)")
    g.add_argument("--cache-scope", default="global", choices=["global", "layer"],
                   help="one cache over all layers, or SIZE per MoE layer (default: global)")
    g.add_argument("--cache-policy", default="lru", choices=sorted(POLICIES), help="eviction policy (default: lru)")
    g.add_argument("--prefetch", default="none", choices=sorted(PREFETCHERS), help="prefetcher (default: none)")
    g.add_argument("--offload-dir", default=None,
                   help="folder for the disk tier's expert store (default: a new temporary folder)")
    g.add_argument("--cpu-assist", action="store_true",
                   help="compute a missing expert where its weights live when the cost model says it is cheaper")
    g.add_argument("--calibration-trace", default=None, metavar="TRACE",
                   help="routing trace (.npz) for static/activation-aware/adapmoe policies and "
                        "transition/mlp prefetchers; the belady policy reads its future from --replay-trace")
    g.add_argument("--replay-trace", default=None, metavar="TRACE",
                   help="force every router's decisions from this routing trace (.npz)")


def config_from_args(args: argparse.Namespace) -> Any:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.offload.config import OffloadConfig

    offload_dir, scratch = args.offload_dir, False
    if args.offload == "disk" and offload_dir is None:
        offload_dir, scratch = scratch_dir("moeinfer-experts-"), True
    return OffloadConfig(tier=args.offload, cache=args.expert_cache, scope=args.cache_scope, policy=args.cache_policy,
                         prefetch=args.prefetch, offload_dir=offload_dir, remove_offload_dir=scratch,
                         cpu_assist=args.cpu_assist,
                         calibration=args.calibration_trace,
                         future=args.replay_trace if args.cache_policy == "belady" else None)


def apply_(model: Any, args: argparse.Namespace) -> Any:
    if getattr(args, "offload", None):
        # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
        from moeinfer.offload.apply import offload_

        offload_(model, config_from_args(args), progress=True)
    if getattr(args, "replay_trace", None):
        # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
        from moeinfer.offload.replay import replay_routing_

        replay_routing_(model, args.replay_trace)
    return model
