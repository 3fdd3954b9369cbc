"""Command-line side of expert parallelism: the options every model-loading subcommand gains, and
what a rank other than 0 does differently (it prints nothing and writes no file).

    torchrun --nproc-per-node 2 -m moeinfer generate -m CKPT --expert-parallel 2 "Hello"
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
from typing import Any

from moeinfer.parallel.apply import expert_parallel_stats
from moeinfer.parallel.config import ExpertParallelConfig
from moeinfer.parallel.stats import format_summary, gather_stats, summarize

OUTPUT_ARGS = ("out", "output", "output_dir")
"""Options naming files a subcommand writes; on ranks other than 0 they point into a scratch folder."""


def add_expert_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert parallelism (run under torchrun)")
    g.add_argument("--expert-parallel", type=int, default=0, metavar="N",
                   help="spread the experts over N processes started by torchrun --nproc-per-node N")
    g.add_argument("--placement", default="contiguous",
                   help="placement strategy (contiguous, round_robin, balanced, replicated) or a JSON file "
                        "from `moeinfer placement` (default: contiguous)")
    g.add_argument("--placement-trace", default=None,
                   help="routing trace/profile that balanced and replicated placements are computed from")
    g.add_argument("--slots-per-rank", type=int, default=None,
                   help="memory budget of the replicated placement, in experts per rank and layer")
    g.add_argument("--ep-overlap", action="store_true", help="two-batch overlap of all-to-all and experts")
    g.add_argument("--ep-timeout", type=float, default=300.0, help="seconds before a silent peer is an error")
    g.add_argument("--ep-stats", action="store_true",
                   help="at exit, rank 0 prints per-rank tokens, bytes, imbalance and comm/compute time (stderr)")


def expert_parallel_config(args: argparse.Namespace) -> Any:
    """An ExpertParallelConfig from the options, or None without --expert-parallel."""
    n = getattr(args, "expert_parallel", 0) or 0
    if n <= 0:
        return None

    return ExpertParallelConfig(size=n, placement=args.placement, profile=args.placement_trace,
                                slots_per_rank=args.slots_per_rank, overlap=args.ep_overlap,
                                timeout_s=args.ep_timeout)


def secondary_rank_quiet_(args: argparse.Namespace, model: Any = None) -> None:
    """On ranks other than 0: stdout to /dev/null and output files into a scratch folder removed at
    exit, so that rank 0 alone prints and writes. Registers the process group's shutdown at exit
    (and, with --ep-stats, the statistics report before it)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    atexit.register(_shutdown)
    if getattr(args, "ep_stats", False) and model is not None:
        atexit.register(_report, model)
    if dist.get_rank() == 0:
        return
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    scratch = tempfile.mkdtemp(prefix=f"moeinfer-rank{dist.get_rank()}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    for name in OUTPUT_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            setattr(args, name, os.path.join(scratch, os.path.basename(value.rstrip("/")) or "out"))


def _report(model: Any) -> None:
    """Every rank joins the gather; rank 0 prints. Best effort: a failed peer only loses the report."""
    try:
        ranks = gather_stats(expert_parallel_stats(model))
    except Exception as e:  # noqa: BLE001 - at exit, after the command's own result
        print(f"moeinfer: expert-parallel statistics unavailable: {e}", file=sys.stderr)
        return
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(format_summary(summarize(ranks)), file=sys.stderr)


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
