"""A checkpoint bigger than RAM, end to end: refused whole, planned, loaded into the plan, generated.

    # once (about 27 GB of bf16 weights on disk; `init` streams, it never holds the model in memory):
    PYTHONPATH=. python -m moeinfer init --arch qwen3_moe --shape Qwen3-30B-A3B --layers 21 \\
        --out /work/bigmodel/qwen3-30b-a3b-21l
    PYTHONPATH=. python benchmarks/bench_planner_bigmodel.py --model /work/bigmodel/qwen3-30b-a3b-21l \\
        --memory 12GB [--quality-from tiny] [--plan plan.yaml] [--tokens 16] [--out bigmodel-bench.json]

Steps:
1. sizes: checkpoint bytes (safetensors headers) against the memory free now;
2. `moeinfer.load(model)` (whole) must be refused with a clear error before allocating: the peak
   RSS of this process after the attempt is recorded beside the weight bytes;
3. plan for `--memory` (`moeinfer.plan`: sizes from config.json and headers, uniform routing since
   the model cannot be loaded to record its own; quantized plans only with `--quality-from`, a model
   whose measured quality loss stands in), or read `--plan`;
4. `moeinfer.load_planned`: dense weights only; bf16 experts offloaded: the checkpoint's files as the
   disk tier; quantized experts: quantized while loading, one layer of float experts at a time (then
   offloaded if the plan says so); wall time and peak RSS after loading;
5. generate `--tokens` tokens greedily from a short prompt (moeinfer.bench.instrument): decode tok/s
   = 1 / median decode step, prefill tok/s = prompt tokens / prefill forward; peak RSS; for an
   offloaded plan, cache hit rate and bytes read from the slow tier;
6. print one line per figure and write them, with the CPU model and the load average, as JSON.
Numbers from a shared or busy machine are not results: the script records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def rss(key: str = "VmHWM:") -> int:
    """This process's peak (VmHWM) or current (VmRSS) resident memory, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (bigger than RAM)")
    ap.add_argument("--memory", default="12GB", help="the planner's memory budget (default 12GB)")
    ap.add_argument("--plan", default=None, help="use this plan file instead of planning now")
    ap.add_argument("--quality-from", default=None,
                    help="planning now: a model whose measured quality stands in (allows quantized plans)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default="bigmodel-bench.json")
    args = ap.parse_args(argv)

    import torch

    import moeinfer
    from moeinfer.loading.errors import CheckpointError
    from moeinfer.planning import Plan
    from moeinfer.planning.sizes import available_memory, checkpoint_bytes

    report: dict[str, Any] = {"model": args.model, "cpu": cpu_model(), "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "load_average_start": os.getloadavg()}
    # 1. sizes
    report["checkpoint_bytes"] = checkpoint_bytes(args.model)
    report["available_bytes"] = available_memory("cpu")
    print(f"checkpoint {report['checkpoint_bytes'] / 1e9:.1f} GB, available {report['available_bytes'] / 1e9:.1f} GB")
    # 2. whole: refused before allocating
    try:
        moeinfer.load(args.model, progress=False)
        report["whole_load"] = "loaded (the checkpoint fits in the free memory: not a bigger-than-RAM run)"
    except CheckpointError as e:
        report["whole_load"] = f"refused: {e}"
    report["peak_rss_after_refusal"] = rss()
    print(f"moeinfer.load whole: {report['whole_load'][:160]}... "
          f"(peak RSS {report['peak_rss_after_refusal'] / 1e9:.2f} GB)")
    # 3. plan
    t0 = time.perf_counter()
    plan = Plan.load(args.plan) if args.plan else moeinfer.plan(args.model, args.memory, progress=False,
                                                                quality_from=args.quality_from)
    report["plan_s"] = time.perf_counter() - t0
    report["plan"] = plan.to_dict()
    pred = plan.predicted
    print(f"plan ({report['plan_s']:.0f} s): {plan.describe()}; predicted decode "
          f"{pred.decode_tok_s if pred else float('nan'):.2f} tok/s, "
          f"memory {pred.memory_bytes / 1e9 if pred else 0:.2f} GB")
    # 4. load into the plan
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bigmodel-store-") as store:  # a quantized disk tier's store
        model = moeinfer.load_planned(args.model, plan, offload_dir=store, progress=False)
        report["load_s"] = time.perf_counter() - t0
        generate(model, plan, args, report)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


def generate(model: Any, plan: Any, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Steps 4 (after the load) and 5."""
    import moeinfer
    from moeinfer.bench.instrument import instrument

    pred = plan.predicted
    report["peak_rss_after_load"] = rss()
    report["rss_after_load"] = rss("VmRSS:")  # what the plan holds; the peak adds the load's float layer
    print(f"loaded in {report['load_s']:.1f} s, peak RSS {report['peak_rss_after_load'] / 1e9:.2f} GB, RSS now "
          f"{report['rss_after_load'] / 1e9:.2f} GB")
    # 5. generate
    prompt = model.tokenizer.encode(PROMPT)
    with instrument(model) as ins:
        out = moeinfer.generate(model, [prompt], max_new_tokens=args.tokens, ignore_eos=True)[0]
    dec = [f.seconds for f in ins.forwards if f.phase == "decode"]
    pre = [f for f in ins.forwards if f.phase == "prefill"]
    report["prompt_tokens"] = len(prompt)
    report["generated_tokens"] = len(out.token_ids)
    report["decode_tok_s"] = 1.0 / statistics.median(dec) if dec else None
    report["prefill_tok_s"] = sum(f.tokens for f in pre) / sum(f.seconds for f in pre) if pre else None
    report["peak_rss"] = rss()
    offload = getattr(model, "offload", None)
    if offload is not None:
        st = offload.cache.stats
        report["cache"] = {"slots": offload.cache.num_slots, "hit_rate": st.hit_rate, "misses": st.misses,
                           "bytes_read_from_checkpoint": getattr(offload.store, "bytes_read", None)}
    report["predicted_decode_tok_s"] = pred.decode_tok_s if pred else None
    report["predicted_prefill_tok_s"] = pred.prefill_tok_s if pred else None
    report["load_average_end"] = os.getloadavg()
    cache = "resident experts"
    if offload is not None:
        offload.close()
        cache = f"cache {report['cache']['slots']} slots, hit rate {st.hit_rate:.1%}"
    print(f"decode {report['decode_tok_s']:.3f} tok/s (predicted {report['predicted_decode_tok_s']:.3f}), prefill "
          f"{report['prefill_tok_s']:.2f} tok/s (predicted {report['predicted_prefill_tok_s']:.2f}); peak RSS "
          f"{report['peak_rss'] / 1e9:.2f} GB; {cache}; load average {report['load_average_start']} -> "
          f"{report['load_average_end']}")


if __name__ == "__main__":
    raise SystemExit(main())
