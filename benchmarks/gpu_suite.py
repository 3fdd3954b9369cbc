"""The GPU bring-up suite (issue 15): every GPU path of moeinfer proved and measured in one short run.

    python benchmarks/gpu_suite.py                      # on a CUDA machine: parts a-f within 480 s
    python benchmarks/gpu_suite.py --skip offload,tests --budget-s 300
    python benchmarks/gpu_suite.py --only layer
    python benchmarks/gpu_suite.py --dry-run --out /tmp/gpu-dry   # the CPU rehearsal (tests/bench/test_gpu_suite.py)

Parts, in order (benchmarks/gpu_suite_parts/, one file each; docs/gpu-suite.md says what each
measures and which target of the issue it checks):
    a env      versions; measured copy, pinned host-to-device and dense bf16 matmul limits
    b tests    pytest -m gpu, one record per test
    c layer    MoE layer table: moeinfer triton vs transformers vs torch._grouped_mm
    d decode   batch-1 decode of an OLMoE-1B-7B-shaped model, CUDA graphs vs transformers generate
    e int4     int4 experts vs bf16 decode
    f offload  Mixtral-8x7B-shaped model at a 24 GB budget, real routing replayed, vs the simulator

How a run goes:
1. each part runs in a forked child process (its own CUDA context: a kernel fault or a hang in one
   part cannot take the others down) with a deadline: its share of the budget, rescaled over the
   parts still to run; a child past its deadline is killed, keeping the rows it had saved;
2. after each part, results.json and summary.md in --out are rewritten whole (temp file + rename),
   so a run cut short leaves every finished part;
3. the targets of the issue are read off the results (gpu_suite_parts/targets.py).
The dry run is the same script on the CPU: tiny shapes, Triton's interpreter, and CPU stand-ins for
the CUDA-only pieces (CUDA events, pinned memory, graphs); it proves the wiring, measures nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [p for p in (str(HERE), str(REPO)) if p not in sys.path]

from gpu_suite_parts import PARTS, Context  # noqa: E402
from gpu_suite_parts.common import write_json  # noqa: E402
from gpu_suite_parts.targets import evaluate  # noqa: E402
from gpu_suite_parts.targets import markdown as targets_markdown  # noqa: E402

from moeinfer.fsutil import atomic_write_text  # noqa: E402

DEFAULT_TRACES = [REPO.parent / "shared" / "data" / "traces" / "mixtral-8x7b-instruct",
                  REPO / "shared" / "data" / "traces" / "mixtral-8x7b-instruct"]


def select_parts(only: str | None, skip: str | None) -> list[str]:
    """Part names to run, in suite order; `only` / `skip` take names or letters, comma-separated."""
    by_key = {p.name: p.name for p in PARTS.values()} | {p.letter: p.name for p in PARTS.values()}

    def names(arg: str | None, flag: str) -> set[str]:
        out = set()
        for key in filter(None, (k.strip() for k in (arg or "").split(","))):
            if key not in by_key:
                valid = ", ".join(f"{p.letter}/{p.name}" for p in PARTS.values())
                raise SystemExit(f"{flag}: unknown part {key!r}; valid: {valid}")
            out.add(by_key[key])
        return out

    keep = names(only, "--only") or set(PARTS)
    return [n for n in PARTS if n in keep and n not in names(skip, "--skip")]


def _child(name: str, ctx: Context, final: Path) -> None:
    """Run one part in the forked child; always leaves `final` (the result, or the error)."""
    os.setpgid(0, 0)  # its own process group: killing it at the deadline takes its children too
    try:
        import torch

        if ctx.device == "cuda" and torch.cuda._is_in_bad_fork():  # the parent must never touch CUDA
            raise RuntimeError("CUDA was initialised before the part was forked")
        result = PARTS[name].run(ctx)
        result.setdefault("status", "ok")
    except BaseException as e:  # every failure is recorded; the suite goes on
        result = _read(ctx.partial) or {}
        result.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-6000:])
    write_json(final, result)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _read(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_part(name: str, ctx: Context, timeout: float) -> dict[str, Any]:
    """Step 1: the part in a forked child with a deadline; its result, or what it saved before dying."""
    import multiprocessing

    final = ctx.scratch / f"{name}.json"
    ctx.partial = ctx.scratch / f"{name}.partial.json"
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(name, ctx, final), name=f"gpu-suite-{name}")
    t0 = time.perf_counter()
    proc.start()
    proc.join(timeout)
    killed = proc.is_alive()
    if killed:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:  # it had not made its own group yet
                if proc.is_alive():
                    os.kill(proc.pid, sig)
            proc.join(5)
            if not proc.is_alive():
                break
    result = _read(final)
    if result is None:
        result = _read(ctx.partial) or {}
        if killed:
            result.update(status="timeout", error=f"killed at its deadline ({timeout:.0f} s); rows saved before it "
                                                  "are kept")
        else:
            result.update(status="crashed", error=f"the part's process died (exit code {proc.exitcode})")
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["deadline_s"] = round(timeout, 1)
    return result


def summary_markdown(results: dict[str, Any]) -> str:
    s = results["suite"]
    dry = s["dry_run"]
    lines = ["# GPU suite results", ""]
    if dry:
        lines += ["**DRY RUN on the CPU** (tiny shapes, Triton's interpreter, CPU stand-ins for CUDA events, "
                  "pinned memory and graphs): it proves the wiring. **No number below is a GPU measurement.**", ""]
    lines += [f"Started {s['started']}, budget {s['budget_s']:.0f} s, elapsed {s.get('elapsed_s', 0):.0f} s; "
              f"command `{s['command']}`.", "",
              "| part | status | seconds |", "|---|---|---:|"]
    for name, p in PARTS.items():
        r = results["parts"].get(name)
        if r is not None:
            lines.append(f"| {p.letter}. {name} | {r['status']} | {r.get('seconds', 0):.1f} |")
    lines += ["", "## Targets (issue 15, item 3)", "", targets_markdown(results["targets"], dry_run=dry)]
    for name, p in PARTS.items():
        r = results["parts"].get(name)
        if r is None:
            continue
        lines += ["", f"## {p.letter}. {p.title} ({name}: {r['status']})", ""]
        if r["status"] == "skipped":
            lines.append(f"Skipped: {r.get('reason')}.")
            continue
        if r.get("error"):
            lines += [f"Error: `{r['error'][:500]}`", ""]
            if r.get("traceback"):
                lines += ["```", r["traceback"][-2500:].rstrip(), "```", ""]
        try:
            lines.append(p.markdown(r))
        except Exception as e:  # a partial result may lack what the table needs
            lines.append(f"(no table: {type(e).__name__}: {e})")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, results: dict[str, Any]) -> None:
    """Step 2: both files rewritten whole, atomically."""
    results["targets"] = evaluate({k: v for k, v in results["parts"].items() if v.get("status") in ("ok", "timeout",
                                                                                                    "failed")})
    write_json(out / "results.json", results)
    atomic_write_text(out / "summary.md", summary_markdown(results))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of all parts (default 480)")
    p.add_argument("--skip", help="parts to skip, comma-separated names or letters (e.g. tests,f)")
    p.add_argument("--only", help="run only these parts, comma-separated names or letters")
    p.add_argument("--out", type=Path, default=Path("gpu-results"), help="folder for results.json and summary.md")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--dry-run", action="store_true",
                   help="on the CPU: tiny shapes, Triton's interpreter, CPU stand-ins for CUDA-only pieces")
    p.add_argument("--traces", type=Path, help="folder of the Mixtral routing traces (*_routing.jsonl); default "
                   "../shared/data/traces/mixtral-8x7b-instruct beside the checkout, or shared/ inside it")
    p.add_argument("--list", action="store_true", help="list the parts and exit")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for part in PARTS.values():
            total = sum(q.share_s for q in PARTS.values())
            print(f"{part.letter}  {part.name:8s} {part.title} (share {part.share_s:.0f} of {total:.0f}, scaled to "
                  "--budget-s)")
        return 0
    names = select_parts(args.only, args.skip)
    traces = args.traces or next((t for t in DEFAULT_TRACES if t.is_dir()), DEFAULT_TRACES[0])
    if "offload" in names and not (traces / "humaneval_2_routing.jsonl").is_file():
        raise SystemExit(f"--traces {traces}: no humaneval_2_routing.jsonl there (part f replays the Mixtral "
                         "traces); give --traces or --skip offload")
    out = args.out
    if (out / "results.json").exists() and not args.overwrite:
        raise SystemExit(f"{out / 'results.json'} exists: pass --overwrite to replace it, or another --out")
    # The parent never initialises CUDA (forked children could not use it then): CUDA's presence is
    # asked of NVML, not the driver. The dry run's kernels run in Triton's interpreter.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible; on a CPU run the rehearsal: --dry-run")
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:  # nothing here can touch CUDA: load the heavy modules once, before forking
        import transformers.models.mixtral.modeling_mixtral  # noqa: F401
        import transformers.models.olmoe.modeling_olmoe  # noqa: F401

        import moeinfer  # noqa: F401
    started = time.time()
    results: dict[str, Any] = {"suite": dict(
        dry_run=args.dry_run, budget_s=args.budget_s, parts=names, traces=str(traces),
        started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=" ".join(["benchmarks/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])])),
        "parts": {}, "targets": []}
    for name in PARTS:
        if name not in names:
            results["parts"][name] = dict(status="skipped", reason="not selected (--only / --skip)")
    write_outputs(out, results)
    limits: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as scratch:
        for i, name in enumerate(names):
            left = args.budget_s - (time.time() - started)
            shares = [PARTS[n].share_s for n in names[i:]]
            timeout = left * shares[0] / sum(shares)
            if timeout < 5:
                results["parts"][name] = dict(status="skipped", reason=f"budget spent ({left:.0f} s left)")
            else:
                print(f"== {PARTS[name].letter}. {name}: up to {timeout:.0f} s", flush=True)
                ctx = Context(dry_run=args.dry_run, device="cpu" if args.dry_run else "cuda", out_dir=out,
                              deadline=time.time() + timeout, traces=traces, repo=REPO, scratch=Path(scratch),
                              limits=limits)
                results["parts"][name] = run_part(name, ctx, timeout)
                r = results["parts"][name]
                print(f"== {name}: {r['status']} in {r['seconds']:.1f} s" + (f" ({r['error']})" if r.get("error")
                                                                             else ""), flush=True)
                if name == "env" and r["status"] == "ok":
                    limits = r["limits"]
            results["suite"]["elapsed_s"] = round(time.time() - started, 1)
            write_outputs(out, results)
    print(f"wrote {out / 'results.json'} and {out / 'summary.md'}")
    return 0 if all(results["parts"][n]["status"] == "ok" for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
