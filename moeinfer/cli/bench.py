"""`moeinfer bench`: the standardized MoE inference benchmark (docs/benchmark.md).

    moeinfer bench                          default suite, shipped model, CPU -> ./bench-results/
    moeinfer bench --config sweep.yaml      a sweep of models x options x workloads
    moeinfer bench --resume                 keep the finished points of an interrupted run
    moeinfer bench compare A.json B.json    differences between two runs, as ratios
    moeinfer bench --list                   workloads, axes and their available values
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = "bench-results"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run the standardized MoE inference benchmark", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default="default",
                   help="sweep file (YAML/JSON) or shipped suite name (default: the 'default' suite)")
    p.add_argument("--out", "-o", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT}/)")
    p.add_argument("--resume", action="store_true", help="skip points already finished in OUT/results.json")
    p.add_argument("--model", "-m", action="append", default=None,
                   help="override the sweep's models (repeatable): checkpoint folder or shipped name")
    p.add_argument("--device", default=None, help="override the sweep's torch device")
    p.add_argument("--workload", "-w", action="append", default=None,
                   help="run only these workloads (repeatable)")
    p.add_argument("--scale", type=float, default=None,
                   help="multiply prompt/output lengths and request counts (e.g. 0.1 for a quick run)")
    p.add_argument("--prompt-source", default=None,
                   help="text the prompts are cut from: english, python, or a file/folder (default: the sweep's)")
    p.add_argument("--no-peaks", action="store_true", help="skip the bandwidth/matmul peak measurement")
    p.add_argument("--plan", default=None, help="plan.yaml (moeinfer plan) applied to every model; predicted beside measured")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list workloads and axes, then exit")
    p.set_defaults(func=run)
    bsub = p.add_subparsers(dest="bench_command", metavar="{compare,report}")
    c = bsub.add_parser("compare", help="compare two results.json files")
    c.add_argument("a", help="baseline results.json (or its folder)")
    c.add_argument("b", help="new results.json (or its folder)")
    c.add_argument("--threshold", type=float, default=0.05, help="relative change worth flagging (default 0.05)")
    c.set_defaults(func=run_compare)
    r = bsub.add_parser("report", help="rewrite report.md/html and plots from a results.json")
    r.add_argument("results", help="results.json (or its folder)")
    r.set_defaults(func=run_report)


def _results_path(x: str) -> Path:
    p = Path(x)
    return p / "results.json" if p.is_dir() else p


def run(args: argparse.Namespace) -> int:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.bench.config import load_sweep

    if args.list:
        return _list()
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.fsutil import check_output_dir

    # bench replaces only its own files (results.json, report.*, plots) in OUT, never deletes; still, a
    # non-empty folder that is not a bench results folder (`--out .` in a project) is refused
    check_output_dir(args.out, overwrite=True, holds_output=lambda d: (d / "results.json").is_file(),
                     what="bench results folder (results.json)")
    cfg = load_sweep(args.config)
    if args.model:
        cfg.models = args.model
    if args.device:
        cfg.device = args.device
    if args.workload:
        cfg.axes["workload"] = args.workload
    if args.scale is not None:
        cfg.scale = args.scale
    if args.prompt_source:
        cfg.prompt_source = args.prompt_source
    if args.no_peaks:
        cfg.peaks = False
    cfg.__post_init__()  # validate the overrides like the file
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.bench.runner import run_sweep

    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.planning.spec import Plan

    plan = Plan.load(args.plan) if args.plan else None
    data = run_sweep(cfg, args.out, resume=args.resume, progress=not args.no_progress,
                     log_fn=lambda s: print(s, file=sys.stderr), plan=plan)
    failed = [p for p in data["points"] if p["status"] != "ok"]
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.bench.report import summary_table

    print(summary_table(data))
    print(f"{len(data['points']) - len(failed)} points ok, {len(failed)} failed; "
          f"results: {Path(args.out) / 'results.json'}, report: {Path(args.out) / 'report.md'}")
    for p in failed:
        print(f"  failed: {p['id']}: {p['error']}", file=sys.stderr)
    for p in data["points"]:
        pl = (p.get("metrics") or {}).get("plan")
        if pl:
            got = pl["measured_decode_tok_s"]
            print(f"plan {pl['configuration']}: {p['id']}: decode predicted {pl['predicted']['decode_tok_s']:.1f} "
                  f"tok/s, measured {'-' if got is None else f'{got:.1f}'}")
    return 1 if failed else 0


def run_compare(args: argparse.Namespace) -> int:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.bench.compare import compare_files

    print(compare_files(_results_path(args.a), _results_path(args.b), threshold=args.threshold))
    return 0


def run_report(args: argparse.Namespace) -> int:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.bench.report import write_report
    from moeinfer.bench.results import read_results

    path = _results_path(args.results)
    for p in write_report(read_results(path), path.parent):
        print(p)
    return 0


def _list() -> int:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.bench import config as c
    from moeinfer.bench.workloads import workloads

    print("workloads:")
    for w in workloads().values():
        print(f"  {w.name:<14} v{w.version}  {w.kind:<10} {w.prompt_tokens:>5} in / {w.output_tokens:>4} out, "
              f"{w.num_requests} requests, batch {w.batch_size}  {w.description}")
    print("axes:")
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.compress.presets import PRESETS
    from moeinfer.kernels import CHOICES
    from moeinfer.offload.policies import POLICIES
    from moeinfer.offload.prefetch import PREFETCHERS

    print(f"  kernel       {', '.join(CHOICES)}")
    print(f"  compression  none, {', '.join(PRESETS)}, or a recipe YAML file")
    print("  routing      default, top-k:K, top-p:P, threshold:T, entropy:H (each optionally :MAX_K)")
    print(f"  offload      none, or POLICY:CACHE[:PREFETCH[:cpu-assist]]; POLICY in {', '.join(sorted(POLICIES))}; "
          f"PREFETCH in {', '.join(sorted(PREFETCHERS))}")
    print("  dtype        null (checkpoint's), float32, bfloat16, float16")
    print("  batch_size   null (workload's) or an integer")
    print("  rate         null (workload's) or requests/s (Poisson-arrival workloads only)")
    print(f"suites: {', '.join(sorted(s.stem for s in c.SUITES_DIR.glob('*.yaml')))}")
    return 0
