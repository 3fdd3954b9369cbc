"""Planner benchmark: predicted vs measured decode/prefill tokens/s and quality for the plans
`moeinfer plan` chooses (and its runners-up) at several memory budgets.

    PYTHONPATH=. python benchmarks/bench_planner.py [--model tiny] [--budgets auto | 80MB,120MB,...]
        [--tokens 32] [--repeats 3] [--max-bytes 16384] [--out planner-bench.json]

For each budget (default: three budgets from the model's own sizes: a few float experts over the
fixed memory, half the float experts, all of them), plan with the default settings, then for the
chosen plan and its 3 runners-up:
1. load the model, `apply_plan_`, warm up;
2. generate `--tokens` tokens greedily from a 64-token prompt (the length of the planner's prefill
   sequences) `--repeats` times under the benchmark's
   instrumentation (moeinfer.bench.instrument): decode tok/s = 1 / median decode step, prefill tok/s
   = prompt tokens / median prefill forward;
3. bits per byte on the held-out english text (`moeinfer.evaluate`, first `--max-bytes` bytes, fp32
   compute on the CPU like `moeinfer eval`) against the unquantized model: measured quality loss
   (plans whose experts all stay in float keep the weights, so their loss is 0 without an evaluation);
4. the same measurements for the issue's baselines that fit the budget (`baselines`: the default,
   a `--fit`-like memory-only rule, uniform int4), for the "at least as fast as the best of them" check;
5. print a table (plan, predicted and measured decode/prefill, ratio, the fastest step's tokens/s,
   predicted/measured quality) and
   write all of it, with the machine profile and load average, as JSON.
Timing numbers from a shared or busy machine are not results: the script records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any


PROMPT_TOKENS = 64


def measure(model_name: str, plan: Any, *, tokens: int, repeats: int, max_bytes: int, base_bpb: float,
            dtype: str | None = None) -> dict[str, Any]:
    import moeinfer
    from moeinfer.bench.instrument import instrument

    from moeinfer.eval.datasets import load_dataset

    model = moeinfer.load(model_name, progress=False, dtype=dtype)
    moeinfer.apply_plan_(model, plan)
    # a prompt as long as the planner's prefill sequences (64 tokens of held-out text)
    prompt = model.tokenizer.encode(load_dataset("english").text[:4000])[:PROMPT_TOKENS]
    moeinfer.generate(model, [prompt], max_new_tokens=4, ignore_eos=True)  # warm-up
    dec: list[float] = []
    pre: list[float] = []
    for _ in range(repeats):
        with instrument(model) as ins:
            moeinfer.generate(model, [prompt] * plan.batch_size, max_new_tokens=tokens, ignore_eos=True)
        dec += [f.seconds for f in ins.forwards if f.phase == "decode"]
        pre += [f.seconds / f.tokens for f in ins.forwards if f.phase == "prefill"]
    decode = plan.batch_size / statistics.median(dec) if dec else None
    prefill = 1.0 / statistics.median(pre) if pre else None
    # the fastest step: what the machine does when no other process takes the cores (the profile's
    # figures are least times too), for reading a run on a busy machine
    best = {"decode_best_tok_s": plan.batch_size / min(dec) if dec else None,
            "prefill_best_tok_s": 1.0 / min(pre) if pre else None}
    del model
    if all(p == "bf16" for p in plan.precisions):  # offloading and kernels do not change the weights
        return {"decode_tok_s": decode, "prefill_tok_s": prefill, **best, "bits_per_byte": base_bpb,
                "quality_loss": 0.0, "quality_note": "float experts: the unquantized model's bits per byte"}
    qmodel = moeinfer.load(model_name, progress=False, dtype="float32")
    moeinfer.apply_plan_(qmodel, plan)
    bpb = moeinfer.evaluate(qmodel, "english", max_bytes=max_bytes, progress=False).bits_per_byte
    return {"decode_tok_s": decode, "prefill_tok_s": prefill, **best, "bits_per_byte": bpb,
            "quality_loss": (bpb - base_bpb) / base_bpb}


def baselines(model_name: str, budget: int) -> dict[str, Any]:
    """The issue's comparison points at `budget` (those that fit by the planner's memory model):
    (a) the default: every expert resident in float, kernel auto; (b) a memory-only rule like
    llama.cpp's --fit: float weights, experts spilled to the slow tier with every slot the budget
    leaves in a plain LRU cache; (c) uniform int4, resident."""
    from moeinfer.planning import Plan, PlanOffload
    from moeinfer.planning.costs import expert_bytes, fixed_bytes
    from moeinfer.planning.sizes import sizes_from_checkpoint

    s = sizes_from_checkpoint(model_name)
    fixed = fixed_bytes(s, batch=1, context=min(1024, s.max_context))
    n, L = s.num_layers * s.num_experts, s.num_layers
    common = dict(model=model_name, device="cpu", budget_bytes=budget, objective="latency")
    out: dict[str, Any] = {}
    if fixed + n * expert_bytes(s, "bf16") <= budget:
        out["default"] = Plan(precisions=("bf16",) * L, kernel="auto", **common)
    else:
        slots = int((budget - fixed) // expert_bytes(s, "bf16"))
        if slots >= 1:
            out["fit-rule"] = Plan(precisions=("bf16",) * L, kernel="reference",
                                   offload=PlanOffload(tier="disk", cache_experts=slots, policy="lru"), **common)
    if fixed + n * expert_bytes(s, "int4") <= budget:
        out["uniform-int4"] = Plan(precisions=("int4",) * L, kernel="auto", **common)
    return out


def default_budgets(model_name: str) -> list[int]:
    from moeinfer.planning.costs import expert_bytes, fixed_bytes
    from moeinfer.planning.sizes import sizes_from_checkpoint

    s = sizes_from_checkpoint(model_name)
    fixed = fixed_bytes(s, batch=1, context=min(1024, s.max_context))
    one = expert_bytes(s, "bf16")
    n = s.num_layers * s.num_experts
    return [int(fixed + k * one) + 1 for k in (max(2, n // 8), n // 2, n + 1)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--budgets", default="auto")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-bytes", type=int, default=16384)
    ap.add_argument("--max-quality-loss", type=float, default=0.01)
    ap.add_argument("--runners", type=int, default=3, help="runners-up measured per budget (default: 3)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the default / --fit-like / int4 baselines")
    ap.add_argument("--out", default="planner-bench.json")
    args = ap.parse_args(argv)

    import moeinfer
    from moeinfer.planning.planner import parse_budget
    from moeinfer.planning.profile import machine_profile

    budgets = (default_budgets(args.model) if args.budgets == "auto"
               else [parse_budget(b) for b in args.budgets.split(",")])
    profile = machine_profile("cpu", variants=("int8", "int4"), progress=True)
    base = moeinfer.evaluate(moeinfer.load(args.model, progress=False, dtype="float32"), "english",
                             max_bytes=args.max_bytes, progress=False).bits_per_byte
    rows = []
    for budget in budgets:
        t0 = time.perf_counter()
        chosen = moeinfer.plan(args.model, budget, max_quality_loss=args.max_quality_loss, profile=profile)
        plan_s = time.perf_counter() - t0
        for rank, p in enumerate((chosen, *chosen.runners_up[:args.runners])):
            got = measure(args.model, p, tokens=args.tokens, repeats=args.repeats, max_bytes=args.max_bytes,
                          base_bpb=base)
            pr = p.predicted
            rows.append({"budget": budget, "rank": rank, "plan": p.describe(), "plan_s": plan_s if rank == 0 else None,
                         "predicted": vars(pr), "measured": got, "load_avg": os.getloadavg()[0]})
            ratio = got["decode_tok_s"] / pr.decode_tok_s if got["decode_tok_s"] else float("nan")
            print(f"{budget / 1e6:8.1f} MB  #{rank + 1}  {p.describe():<60}  decode {pr.decode_tok_s:8.1f} -> "
                  f"{got['decode_tok_s']:8.1f} ({ratio:5.2f}x)  prefill {pr.prefill_tok_s:8.1f} -> "
                  f"{got['prefill_tok_s']:8.1f} ({got['prefill_tok_s'] / pr.prefill_tok_s:5.2f}x)  fastest step "
                  f"{got['decode_best_tok_s']:8.1f} / {got['prefill_best_tok_s']:8.1f}  quality "
                  f"{100 * (pr.quality_loss or 0):+.2f}% -> {100 * got['quality_loss']:+.2f}%", flush=True)
        if not args.no_baselines:
            for name, b in baselines(args.model, budget).items():
                got = measure(args.model, b, tokens=args.tokens, repeats=args.repeats, max_bytes=args.max_bytes,
                              base_bpb=base)
                rows.append({"budget": budget, "baseline": name, "plan": b.describe(), "measured": got,
                             "load_avg": os.getloadavg()[0]})
                print(f"{budget / 1e6:8.1f} MB  {name:<14}  {b.describe():<60}  decode measured "
                      f"{got['decode_tok_s']:8.1f}  prefill {got['prefill_tok_s']:8.1f}  fastest step "
                      f"{got['decode_best_tok_s']:8.1f} / {got['prefill_best_tok_s']:8.1f}  quality "
                      f"{100 * got['quality_loss']:+.2f}%", flush=True)
    out = {"model": args.model, "profile": profile.to_dict(), "base_bits_per_byte": base, "rows": rows,
           "note": "timings from the machine this ran on; check load_avg before reading them as results"}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
