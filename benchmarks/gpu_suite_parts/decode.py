"""Parts d and e: batch-1 decode of an OLMoE-1B-7B-shaped model with random weights, full depth.

d. moeinfer (triton kernel, CUDA-graph decode: what `moeinfer.generate` does on CUDA) vs
   transformers `generate` on the same weights: benchmarks/bench_moe.py's `bench_e2e`; tokens/s as
   % of the roofline (measured copy bandwidth / bytes of weights read per token);
e. the same shape built directly on the device (no checkpoint), decoded in bf16, then its experts
   quantized to int4 (round-to-nearest, groups of 128: the decode cost does not depend on how the
   codes were chosen) and decoded again through the fused dequantizing kernel.
The dry run: a 2-layer model of the same kind, D=32, 4 new tokens, Triton's interpreter, no graph.
"""

from __future__ import annotations

from typing import Any

from gpu_suite_parts.common import OLMOE_1B_7B, Context, Result, part, random_model, timed

DRY_OLMOE = dict(OLMOE_1B_7B, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, vocab_size=128,
                 max_position_embeddings=64, eos_token_id=1, pad_token_id=0)
PROMPT = list(range(10, 26))
CHECKPOINT_BYTES = 14 * 10**9  # OLMoE-1B-7B in bf16, written once for moeinfer.load to read back


def _bandwidth(ctx: Context) -> float:
    if ctx.limits:
        return float(ctx.limits["copy_bytes_s"])
    from moeinfer.bench.hardware import measure_bandwidth

    return measure_bandwidth(ctx.torch_device())


@part("decode", letter="d", title="End-to-end batch-1 decode vs transformers", share_s=75,
      markdown=lambda r: markdown_decode(r))
def run_decode(ctx: Context) -> Result:
    from bench_moe import bench_e2e, olmoe_pair

    shape = DRY_OLMOE if ctx.dry_run else OLMOE_1B_7B
    hf_shape = {k: v for k, v in shape.items() if k not in ("model_type", "rms_norm_eps", "rope_theta",
                                                            "tie_word_embeddings")}
    dev = ctx.torch_device()
    pair, setup_s = timed(lambda: olmoe_pair(dev, hf_shape, tmp_dir=ctx.tmp_dir(CHECKPOINT_BYTES)))
    rows = bench_e2e(dev, 4 if ctx.dry_run else 64, shape=hf_shape, bandwidth=_bandwidth(ctx),
                     allow_cpu=ctx.dry_run, pair=pair)
    return dict(meta=rows[0], rows=rows[1:], setup_s=setup_s)


def markdown_decode(r: Result) -> str:
    from bench_moe import markdown

    m = r["meta"]
    head = (f"Roofline: {m['measured_bandwidth_bytes_s'] / 1e9:.0f} GB/s / {m['bytes_per_token'] / 1e9:.2f} GB of "
            f"weights per token = {m['measured_bandwidth_bytes_s'] / m['bytes_per_token']:.0f} tok/s.")
    ours = next(x for x in r["rows"] if x["system"].startswith("moeinfer"))
    theirs = next(x for x in r["rows"] if x["system"].startswith("transformers"))
    tail = (f"moeinfer / transformers: {ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x. Set-up (random "
            f"weights, a checkpoint in RAM, moeinfer.load): {r.get('setup_s', 0):.0f} s.")
    return "\n".join([head, "", markdown("e2e", [m] + r["rows"]), "", tail])


def decode_rate(model: Any, new_tokens: int) -> float:
    import torch
    from bench_moe import moeinfer_decode_rate

    with torch.no_grad():
        return moeinfer_decode_rate(model, PROMPT, new_tokens)


def kernel_profile(model: Any, device: str, *, tokens: int = 8, top: int = 12) -> dict[str, Any]:
    """Where a decode's device time goes: torch.profiler over `decode_rate(model, tokens)` (two
    `generate` calls of `tokens` new tokens after the 16-token prompt), the `top` kernels by total
    device time (host time in the dry run). A failure is recorded, not raised: this is a diagnosis."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    try:
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            decode_rate(model, tokens)
            if cuda:
                torch.cuda.synchronize()
        def spent(e: Any) -> float:
            return float(getattr(e, "device_time_total", 0.0) if cuda else e.cpu_time_total)
        events = [e for e in prof.key_averages() if spent(e) > 0]
        total = sum(spent(e) for e in events)
        rows = [dict(kernel=e.key[:90], calls=e.count, total_us=spent(e), share=spent(e) / total)
                for e in sorted(events, key=spent, reverse=True)[:top]]
        return dict(clock="device" if cuda else "host", tokens=2 * tokens, total_us=total, rows=rows)
    except Exception as e:  # noqa: BLE001 - a diagnosis never fails the part
        return dict(error=f"{type(e).__name__}: {e}")


def graph_note(model: Any, device: str) -> str:
    """Whether `generate` decodes this model through a CUDA graph, and if not, why."""
    from moeinfer.engine.static_decode import static_decode_blocker

    if device != "cuda":
        return "no (CPU: the dry run's stand-in)"
    why = static_decode_blocker(model)
    return "yes" if why is None else f"no: {why}"


@part("int4", letter="e", title="int4 experts vs bf16 decode", share_s=50, markdown=lambda r: markdown_int4(r))
def run_int4(ctx: Context) -> Result:
    import torch

    from moeinfer.compress import compress_
    from moeinfer.kernels import use_kernel_

    shape = DRY_OLMOE if ctx.dry_run else OLMOE_1B_7B
    n = 4 if ctx.dry_run else 64
    model, build_s = timed(lambda: random_model(shape, device=ctx.torch_device(), dtype=torch.bfloat16))
    use_kernel_(model, "triton")
    bandwidth = _bandwidth(ctx)
    result: Result = dict(build_s=build_s, rows=[], bandwidth_bytes_s=bandwidth)
    bf16 = decode_rate(model, n)
    nbytes = weight_bytes_per_token(model)
    result["rows"].append(dict(experts="bf16", decode_tok_s=bf16, bytes_per_token=nbytes,
                               pct_roofline=100 * bf16 * nbytes / bandwidth, cuda_graph=graph_note(model, ctx.device)))
    ctx.save(result)
    result["profile_bf16"] = kernel_profile(model, ctx.device, tokens=4 if ctx.dry_run else 8)
    ctx.save(result)
    group = 16 if ctx.dry_run else 128
    recipe = [{"method": "quantize", "bits": 4, "group_size": group, "algorithm": "rtn"}]
    _, result["quantize_s"] = timed(lambda: compress_(model, recipe, progress=False))
    experts = model.moe_blocks()[0].experts
    int4 = decode_rate(model, n)
    nbytes = weight_bytes_per_token(model)
    result["rows"].append(dict(experts=f"int4 (rtn, group {group}), {type(experts).__name__}", decode_tok_s=int4,
                               bytes_per_token=nbytes, pct_roofline=100 * int4 * nbytes / bandwidth,
                               cuda_graph=graph_note(model, ctx.device)))
    result["int4_over_bf16"] = int4 / bf16
    ctx.save(result)
    result["profile_int4"] = kernel_profile(model, ctx.device, tokens=4 if ctx.dry_run else 8)
    return result


def weight_bytes_per_token(model: Any) -> int:
    """Bytes of weights a batch-1 token reads (as num_parameters()'s "active", in stored bytes): every
    non-expert weight, plus top-k experts' stored bytes (bf16, or codes with scales and zeros)."""
    total = 0
    for block in model.moe_blocks():
        e = block.experts
        per_expert = sum(p.numel() * p.element_size() for p in e.parameters()) / e.num_experts
        total += int(per_expert * model.config.top_k)
    expert_ids = {id(p) for b in model.moe_blocks() for p in b.experts.parameters()}
    total += sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in expert_ids)
    return total


def markdown_int4(r: Result) -> str:
    lines = ["| experts | decode tok/s | GB read per token | % of roofline | CUDA graph |", "|---|---:|---:|---:|---|"]
    lines += [f"| {x['experts']} | {x['decode_tok_s']:.1f} | {x['bytes_per_token'] / 1e9:.3f} | "
              f"{x['pct_roofline']:.0f} | {x.get('cuda_graph', '?')} |" for x in r.get("rows", [])]
    if "int4_over_bf16" in r:
        lines += ["", f"int4 / bf16 decode: {r['int4_over_bf16']:.2f}x."]
    for name in ("bf16", "int4"):
        prof = r.get(f"profile_{name}")
        if not prof:
            continue
        if "error" in prof:
            lines += ["", f"Profile of the {name} decode failed: {prof['error']}"]
            continue
        lines += ["", f"Where the {name} decode's {prof['clock']} time goes ({prof['tokens']} new tokens after a "
                      f"16-token prompt, twice; {prof['total_us'] / 1e3:.1f} ms in all):", "",
                  "| kernel | calls | total (us) | share |", "|---|---:|---:|---:|"]
        lines += [f"| `{x['kernel']}` | {x['calls']} | {x['total_us']:.0f} | {100 * x['share']:.1f}% |"
                  for x in prof["rows"]]
    return "\n".join(lines)
