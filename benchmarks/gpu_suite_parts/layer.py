"""Part c: the MoE layer table, benchmarks/bench_moe.py's `bench_layer` on the issue's three shapes.

Mixtral-8x7B, Qwen3-30B-A3B and OLMoE-1B-7B at 1/8/64/512/4096 tokens, bf16: moeinfer triton (and
its CUDA-graph replay at <= 64 tokens), the eager reference, transformers' experts implementations
(eager, batched_mm, grouped_mm) and torch._grouped_mm, each as % of the measured copy bandwidth and
of dense matmul (part a's limits). Each candidate's timing gets an equal slice of the part's time;
what is left then tunes the kernel's launch configs (benchmarks/tune_moe.py), smallest shapes first.
The dry run: shapes divided by 32 (E and K kept), 1 token, Triton's interpreter, one call each.
"""

from __future__ import annotations

from gpu_suite_parts.common import Context, Result, part

DRY_SCALE = 32  # keeps every row 16-byte aligned, as torch._grouped_mm requires
CANDIDATES = 7  # timed per (shape, tokens) on a GPU: triton, triton graph, reference, 3 transformers, grouped_mm


@part("layer", letter="c", title="MoE layer table", share_s=120, markdown=lambda r: markdown(r))
def run(ctx: Context) -> Result:
    import torch
    from bench_moe import GPU_TOKENS, bench_layer, measure_peaks

    dev = ctx.torch_device()
    tokens = (1,) if ctx.dry_run else GPU_TOKENS
    lim = ctx.limits
    peaks = ((lim["copy_bytes_s"], lim["matmul_flops"]) if lim else measure_peaks(dev, torch.bfloat16))
    result: Result = dict(measured_bandwidth_bytes_s=peaks[0], measured_matmul_flops=peaks[1], rows=[])
    n = 3 * len(tokens) * CANDIDATES
    # half the time is split evenly over the timed loops; the rest is for warm-ups, Triton compiles, tuning
    budget = 0.0 if ctx.dry_run else max(0.05, 0.5 * ctx.time_left() / n)

    def on_row(row: dict) -> None:
        result["rows"].append(row)
        ctx.save(result)

    bench_layer(dev, torch.bfloat16, tokens, DRY_SCALE if ctx.dry_run else 1, peaks=peaks, gpu_path=True,
                budget_s=budget, warmup=0 if ctx.dry_run else 3, reps=1 if ctx.dry_run else None, on_row=on_row)
    tune_while_time_remains(ctx, result)
    return result


# Tuning order: the 4096-token prefill (the target furthest off after the first GPU run), then batch-1
# decode, the smaller shapes first (their weights are made fastest); the dry run tunes tune_moe.py's
# smoke shape in fp32 with one config.
TUNE_PLAN = [("Qwen3-30B-A3B", 4096), ("Mixtral-8x7B", 4096), ("OLMoE-1B-7B", 4096)] + [
    (s, b) for b in (1, 8) for s in ("OLMoE-1B-7B", "Qwen3-30B-A3B", "Mixtral-8x7B")]
TUNE_CONFIGS = 6  # configs tried per bucket: each costs a Triton compile (~1-2 s)
# A step starts only with twice its expected cost left (compiles, plus drawing Mixtral's 1.9 B weights).
TUNE_STEP_S = {"OLMoE-1B-7B": 12.0, "Qwen3-30B-A3B": 12.0, "Mixtral-8x7B": 25.0}


def tune_while_time_remains(ctx: Context, result: Result) -> None:
    """The issue's "tuning only if time remains": benchmarks/tune_moe.py's `tune_shape` per (shape,
    token bucket), a capped search space each, the tables kept in the result (the device's files do
    not come back; docs/gpu-suite.md says how to write them to moeinfer/kernels/configs/)."""
    import torch
    from bench_moe import LAYER_SHAPES
    from tune_moe import tune_shape

    from moeinfer.kernels.configs import config_file_name, device_name

    dev = ctx.torch_device()
    plan = [("tune_moe --smoke shape", 1)] if ctx.dry_run else TUNE_PLAN
    tuned: dict[str, dict] = {}
    result["tuned"] = tuned
    for name, bucket in plan:
        if not ctx.dry_run and ctx.time_left() < 2 * TUNE_STEP_S[name]:
            result["tuning_stopped"] = f"{ctx.time_left():.0f} s left before {name} at {bucket} tokens"
            break
        s = dict(E=8, K=2, D=40, I=24) if ctx.dry_run else LAYER_SHAPES[name]
        table = tune_shape(s["E"], s["K"], s["D"], s["I"], device=dev,
                           dtype=torch.float32 if ctx.dry_run else torch.bfloat16, buckets=(bucket,),
                           max_configs=1 if ctx.dry_run else TUNE_CONFIGS)
        key = config_file_name(E=s["E"], N=s["I"], K=s["D"], device=device_name(dev))
        tuned.setdefault(key, {}).update(table)
        ctx.save(result)


def markdown(r: Result) -> str:
    from bench_moe import markdown as table

    if not r.get("rows"):
        return "No row was measured."
    meta = dict(measured_bandwidth_bytes_s=r["measured_bandwidth_bytes_s"],
                measured_matmul_flops=r["measured_matmul_flops"])
    out = table("layer", [meta] + r["rows"])
    tuned = r.get("tuned") or {}
    if tuned:
        out += "\n\nTuned launch configs (in results.json, part `layer`, key `tuned`): " + "; ".join(
            f"{k}: buckets {', '.join(sorted(v, key=int))}" for k, v in tuned.items())
    if r.get("tuning_stopped"):
        out += f"\n\nTuning stopped: {r['tuning_stopped']}."
    return out
