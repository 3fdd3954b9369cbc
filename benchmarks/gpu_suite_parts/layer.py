"""Part c: the MoE layer table, benchmarks/bench_moe.py's `bench_layer` on the issue's three shapes.

Mixtral-8x7B, Qwen3-30B-A3B and OLMoE-1B-7B at 1/8/64/512/4096 tokens, bf16: moeinfer triton (and
its CUDA-graph replay at <= 64 tokens), the eager reference, transformers' experts implementations
(eager, batched_mm, grouped_mm) and torch._grouped_mm, each as % of the measured copy bandwidth and
of dense matmul (part a's limits). Each candidate's timing gets an equal slice of the part's time.
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
    # the time after warm-ups is split evenly; a third is kept for warm-ups and Triton's compiles
    budget = 0.0 if ctx.dry_run else max(0.05, 0.66 * ctx.time_left() / n)

    def on_row(row: dict) -> None:
        result["rows"].append(row)
        ctx.save(result)

    bench_layer(dev, torch.bfloat16, tokens, DRY_SCALE if ctx.dry_run else 1, peaks=peaks, gpu_path=True,
                budget_s=budget, warmup=0 if ctx.dry_run else 3, reps=1 if ctx.dry_run else None, on_row=on_row)
    return result


def markdown(r: Result) -> str:
    from bench_moe import markdown as table

    if not r.get("rows"):
        return "No row was measured."
    meta = dict(measured_bandwidth_bytes_s=r["measured_bandwidth_bytes_s"],
                measured_matmul_flops=r["measured_matmul_flops"])
    return table("layer", [meta] + r["rows"])
