"""MoE kernel benchmarks: one MoE layer, end-to-end decode, and the shipped model on the CPU.

    python benchmarks/bench_moe.py --part cpu-model                 # moeinfer-tiny, CPU, 2 threads
    python benchmarks/bench_moe.py --part layer --device cpu        # scaled-down layer shapes (labelled)
    python benchmarks/bench_moe.py --part layer --device cuda       # the issue's three real shapes
    python benchmarks/bench_moe.py --part e2e --device cuda         # OLMoE-shaped random model decode

Shapes: N tokens, D hidden, E experts, K top-k, I expert inner size.
Every figure is printed beside a baseline measured in the same run (the eager reference, and
transformers' experts implementations `eager`, `batched_mm`, `grouped_mm` on the same weights) and,
for the layer, beside the physical limits measured in the same run (moeinfer.bench.hardware: copy
bandwidth, dense matmul). Results go to benchmarks/results/moe_<part>_<device>.json and to stdout as
markdown tables (docs/benchmarks.md carries the committed ones).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moeinfer.bench.hardware import hardware_info, measure_bandwidth, measure_matmul, software_info
from moeinfer.timing import time_call

RESULTS = Path(__file__).parent / "results"

# The real layer shapes, and CPU-sized stand-ins with the same E and K (labelled "scaled").
LAYER_SHAPES = {
    "Mixtral-8x7B": dict(E=8, K=2, D=4096, I=14336),
    "Qwen3-30B-A3B": dict(E=128, K=8, D=2048, I=768),
    "OLMoE-1B-7B": dict(E=64, K=8, D=2048, I=1024),
}
CPU_SCALE = 8  # CPU stand-ins divide D and I by this
GPU_TOKENS = (1, 8, 64, 512, 4096)
CPU_TOKENS = (1, 8, 64, 512)


# --------------------------------------------------------------------------- timing (one helper)

# CPU timings read this clock: wall time by default; `--clock cpu` uses the process's CPU time, which
# with one thread is what the work costs on a core of its own even when other jobs share the
# machine (it cannot see time spent waiting for memory any differently, only descheduled time).
CLOCK: Callable[[], float] = time.perf_counter

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, reps: int = 20,
            cuda_graph: bool = False, budget_s: float = 10.0) -> float:
    """Median seconds of one call of `fn` through moeinfer.timing.time_call (warm-up, CUDA events on
    GPU, optional CUDA-graph replay), read with this script's CLOCK on the CPU."""
    return time_call(fn, device=device, warmup=warmup, reps=reps, cuda_graph=cuda_graph, budget_s=budget_s,
                     clock=CLOCK)


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    sw = software_info()
    try:
        import transformers

        sw["transformers"] = transformers.__version__
    except ImportError:
        sw["transformers"] = None
    try:
        import triton

        sw["triton"] = triton.__version__
    except ImportError:
        sw["triton"] = None
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), hardware=hardware_info(device),
                software=sw, threads=torch.get_num_threads(), load_average_before=load_average())


# --------------------------------------------------------------------------- one MoE layer

def transformers_experts(shape: dict[str, int], gate_up: torch.Tensor, down: torch.Tensor, impl: str):
    """transformers' MixtralExperts on our weights (same layout), running experts implementation `impl`."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=shape["D"], intermediate_size=shape["I"], num_local_experts=shape["E"],
                        num_experts_per_tok=shape["K"])
    cfg._experts_implementation = impl
    with torch.device("meta"):  # no random init of weights that are replaced at once
        experts = MixtralExperts(cfg)
    experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return experts


def grouped_mm_baseline(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor,
                        down: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm on expert-sorted slots (CUDA, bf16): the plain-PyTorch grouped GEMM."""
    N, K = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat)
    offs = torch.cumsum(torch.bincount(flat, minlength=gate_up.shape[0]), 0).to(torch.int32)
    xs = x[order // K]
    h = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)
    g, u = h.chunk(2, dim=-1)
    y = torch._grouped_mm(torch.nn.functional.silu(g) * u, down.transpose(1, 2), offs=offs)
    out = torch.zeros(N * K, x.shape[1], dtype=x.dtype, device=x.device)
    out[order] = y
    return (out.view(N, K, -1) * w.to(x.dtype)[..., None]).sum(1)


def measure_peaks(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """Copy bandwidth (bytes/s, read + write) and dense matmul FLOP/s of `dtype` (fp32 on a CPU
    without native half matmul, where the fast paths compute in fp32), timed with the same clock as
    the kernels (moeinfer.bench.hardware's figures with time_fn)."""
    if device.type == "cuda":
        return measure_bandwidth(device), measure_matmul(device, dtype)
    from moeinfer.kernels.cpu import slow_half_matmul

    src = torch.ones(32 << 20, device=device)  # 128 MiB
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / time_fn(lambda: dst.copy_(src), device, reps=5)
    mm_dtype = torch.float32 if slow_half_matmul(dtype) else dtype
    n = 1024
    a, b = torch.randn(n, n).to(mm_dtype), torch.randn(n, n).to(mm_dtype)
    return bandwidth, 2 * n**3 / time_fn(lambda: a @ b, device, reps=5)


def bench_layer(device: torch.device, dtype: torch.dtype, tokens: tuple[int, ...], scale: int, *,
                peaks: tuple[float, float] | None = None, gpu_path: bool | None = None,
                shapes: list[str] | None = None, budget_s: float = 4.0, warmup: int = 3, reps: int | None = None,
                on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """The layer table. `peaks` (copy bytes/s, matmul FLOP/s) skips measuring them again; `gpu_path`
    (default: on CUDA) times the GPU candidates (triton, torch._grouped_mm, a CUDA-graph replay)
    even on the CPU, where Triton's interpreter and plain calls stand in (benchmarks/gpu_suite.py
    --dry-run); `budget_s` caps each candidate's timing (after `warmup` calls; `reps` timed calls at
    most); `on_row` sees each row as it is made."""
    from moeinfer.kernels import get_kernel
    from moeinfer.kernels.registry import KERNELS, resolve

    gpu_path = device.type == "cuda" if gpu_path is None else gpu_path
    bandwidth, matmul = peaks or measure_peaks(device, dtype)
    print(f"measured: copy bandwidth {bandwidth / 1e9:.1f} GB/s, dense {dtype} matmul {matmul / 1e12:.3f} TFLOP/s")
    rows = []
    for name, full in LAYER_SHAPES.items():
        if shapes is not None and name not in shapes:
            continue
        shape = dict(full, D=full["D"] // scale, I=full["I"] // scale)
        E, K, D, I = shape["E"], shape["K"], shape["D"], shape["I"]
        label = name if scale == 1 else f"{name} /{scale} (E={E}, K={K}, D={D}, I={I})"
        g = torch.Generator(device="cpu").manual_seed(0)
        gw = torch.Generator(device=device).manual_seed(0)  # weights drawn where they live (GB on a GPU)
        gate_up = (torch.randn(E, 2 * I, D, generator=gw, device=device) / D**0.5).to(dtype)
        down = (torch.randn(E, D, I, generator=gw, device=device) / I**0.5).to(dtype)
        gate_up32 = down32 = None
        if device.type == "cpu" and dtype != torch.float32 and not gpu_path:
            gate_up32, down32 = gate_up.float(), down.float()
        hf_experts = {}
        for impl in ("eager", "batched_mm", "grouped_mm"):
            try:
                hf_experts[impl] = transformers_experts(shape, gate_up, down, impl)
            except Exception as e:  # an implementation missing in this version is recorded
                print(f"  transformers {impl}: unavailable ({type(e).__name__}: {str(e)[:80]})")
        for N in tokens:
            x = torch.randn(N, D, generator=g).to(device=device, dtype=dtype)
            idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]).to(device)
            w = torch.rand(N, K, generator=g).to(device)
            used = int(torch.unique(idx).numel())
            nbytes = used * 3 * D * I * gate_up.element_size() + 2 * N * D * x.element_size()
            flops = 2 * N * K * 3 * D * I
            cands: dict[str, Callable[[], Any]] = {}
            graphed = set()  # backends also timed as a CUDA-graph replay (no host sync inside)
            resolve("auto", device)  # registers the backends
            for k in (["triton", "reference"] if gpu_path else ["reference", "cpu"]):
                if KERNELS[k].why_unavailable(device) is None:
                    cands[f"moeinfer {k}"] = (lambda fn=get_kernel(k, device): fn(x, idx, w, gate_up, down))
            if gate_up32 is not None:
                cands["moeinfer cpu, fp32 weights"] = lambda: get_kernel("cpu")(x.float(), idx, w, gate_up32,
                                                                                down32).to(dtype)
            for impl, hf in hf_experts.items():
                try:
                    hf(x, idx, w.to(dtype))
                    cands[f"transformers {impl}"] = (lambda hf=hf: hf(x, idx, w.to(dtype)))
                except Exception as e:  # an implementation missing on this device/version is recorded
                    print(f"  transformers {impl}: unavailable ({type(e).__name__}: {str(e)[:80]})")
            if gpu_path:
                try:
                    grouped_mm_baseline(x, idx, w, gate_up, down)
                    cands["torch._grouped_mm"] = lambda: grouped_mm_baseline(x, idx, w, gate_up, down)
                except RuntimeError as e:  # e.g. rows not 16-byte aligned, or no kernel for this device
                    print(f"  torch._grouped_mm: unavailable ({type(e).__name__}: {str(e)[:80]})")
                if "moeinfer triton" in cands and N <= 64 and device.type == "cuda":
                    cands["moeinfer triton, CUDA graph"] = cands["moeinfer triton"]
                    graphed.add("moeinfer triton, CUDA graph")
            for backend, fn in cands.items():
                with torch.no_grad():
                    t = time_fn(fn, device, warmup=warmup, reps=reps or (10 if N >= 512 else 30), budget_s=budget_s,
                                cuda_graph=backend in graphed)
                rows.append(dict(shape=label, tokens=N, backend=backend, seconds=t, experts_used=used,
                                 gb_s=nbytes / t / 1e9, pct_bandwidth=100 * nbytes / t / bandwidth,
                                 tflop_s=flops / t / 1e12, pct_matmul=100 * flops / t / matmul))
                if on_row is not None:
                    on_row(rows[-1])
                print(f"  {label} N={N} {backend}: {t * 1e6:.0f} us, {nbytes / t / 1e9:.1f} GB/s "
                      f"({100 * nbytes / t / bandwidth:.0f}% of copy), {100 * flops / t / matmul:.0f}% of matmul",
                      flush=True)
    return [dict(measured_bandwidth_bytes_s=bandwidth, measured_matmul_flops=matmul)] + rows


# --------------------------------------------------------------------------- the shipped model on the CPU

def _token_intervals(run: Callable[[Callable[[], None]], Any], n: int) -> float:
    """Median seconds between consecutive new tokens of one generation of n tokens; `run(stamp)`
    generates and calls stamp() per new token. The median keeps one slow step (another process on
    the machine) from skewing the rate; prefill and the first token are excluded."""
    stamps: list[float] = []
    run(lambda: stamps.append(CLOCK()))
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    if len(gaps) < n // 2:
        raise RuntimeError(f"expected about {n} token stamps, got {len(stamps)}")
    return statistics.median(gaps)


def moeinfer_runner(model: Any, prompt: list[int], n: int) -> Callable[[Callable[[], None]], None]:
    """`run(stamp)`: one greedy generation of n tokens by moeinfer, stamp() per new token."""
    import moeinfer

    def run(stamp: Callable[[], None]) -> None:
        moeinfer.generate(model, [prompt], max_new_tokens=n, ignore_eos=True, on_token=lambda b, t, d: stamp())

    return run


def transformers_runner(hf: Any, ids: torch.Tensor, n: int,
                        sync: Callable[[], None] = lambda: None) -> Callable[[Callable[[], None]], None]:
    """`run(stamp)`: one greedy `generate` of n tokens by transformers, stamp() per new token."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self, stamp: Callable[[], None]) -> None:
            self.stamp = stamp

        def put(self, value: Any) -> None:  # first call: the prompt; then one call per new token
            sync()
            self.stamp()

        def end(self) -> None:
            pass

    def run(stamp: Callable[[], None]) -> None:
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, streamer=Stamps(stamp))

    return run


def moeinfer_decode_rate(model: Any, prompt: list[int], n: int) -> float:
    run = moeinfer_runner(model, prompt, n)
    run(lambda: None)  # warm-up
    return 1 / _token_intervals(run, n)


def transformers_decode_rate(hf: Any, ids: torch.Tensor, n: int, sync: Callable[[], None] = lambda: None) -> float:
    run = transformers_runner(hf, ids, n, sync)
    run(lambda: None)
    return 1 / _token_intervals(run, n)


def interleaved_rates(runs: dict[str, Callable[[Callable[[], None]], None]], n: int,
                      rounds: int) -> dict[str, list[float]]:
    """Decode tok/s of every configuration in `rounds` rounds, each round running every configuration
    once (1 / median gap between tokens of one generation), the order rotated by one each round so
    that no configuration always follows the same one: a slow spell of the machine then costs every
    configuration alike instead of one."""
    labels = list(runs)
    for label in labels:
        runs[label](lambda: None)  # warm-up
    rates: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            rates[label].append(1 / _token_intervals(runs[label], n))
    return rates


def bench_cpu_model(threads: int, new_tokens: int, rounds: int = 5) -> list[dict[str, Any]]:
    """moeinfer-tiny: batch-1 decode and a 512-token prefill, moeinfer kernels vs transformers.

    Every configuration is a model of its own, all loaded together, and decode is measured in
    interleaved rounds (`interleaved_rates`): decode_tok_s = the best round (the machine's least
    disturbed moment, comparable across configurations measured in the same rounds), with the median
    round beside it. Prefill: best of 5 forwards of 512 tokens per configuration."""
    import moeinfer
    from moeinfer.models import resolve_model_path
    from moeinfer.kernels import use_kernel_

    torch.set_num_threads(threads)
    path = resolve_model_path("tiny")
    rows = []
    prompt = list(range(10, 26))  # 16 prompt tokens
    g = torch.Generator().manual_seed(0)
    for dtype in ("bfloat16", "float32"):
        setups: list[tuple[str, Callable[[Any], Any]]] = [
            ("moeinfer reference", lambda m: use_kernel_(m, "reference")),
            ("moeinfer cpu", lambda m: use_kernel_(m, "cpu")),
        ]
        if dtype != "float32":
            setups.append(("moeinfer cpu, fp32 expert weights", lambda m: use_kernel_(m, "cpu", fp32_weights=True)))
        setups.append(("moeinfer cpu, native dense path", lambda m: use_kernel_(m, "cpu", linears=True)))
        models: dict[str, Any] = {}
        for label, setup in setups:
            models[label] = moeinfer.load("tiny", dtype=dtype, progress=False)
            setup(models[label])
        ctx = models[setups[0][0]].config.max_position_embeddings
        vocab = models[setups[0][0]].config.vocab_size
        prefill_ids = torch.randint(0, vocab, (512 // ctx, ctx), generator=g)  # 512 tokens
        runs = {label: moeinfer_runner(m, prompt, new_tokens) for label, m in models.items()}
        forwards = {label: (lambda m=m: m(prefill_ids)) for label, m in models.items()}
        from transformers import MixtralForCausalLM

        for impl in ("eager", "batched_mm", "grouped_mm"):
            try:
                hf = MixtralForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                        experts_implementation=impl).eval()
            except Exception as e:
                print(f"  transformers {impl}: unavailable ({type(e).__name__}: {str(e)[:80]})")
                continue
            runs[f"transformers {impl}"] = transformers_runner(hf, torch.tensor([prompt]), new_tokens)
            forwards[f"transformers {impl}"] = lambda hf=hf: hf(prefill_ids, use_cache=False)
        with torch.no_grad():
            rates = interleaved_rates(runs, new_tokens, rounds)
            for label in runs:
                pre = prefill_ids.numel() / time_fn(forwards[label], torch.device("cpu"), warmup=1, reps=5)
                dec, med = max(rates[label]), statistics.median(rates[label])
                rows.append(dict(dtype=dtype, system=label, decode_tok_s=dec, decode_tok_s_median_round=med,
                                 decode_rounds=rates[label], prefill_tok_s=pre))
                print(f"  {dtype} {label}: decode {dec:.1f} tok/s (median round {med:.1f}), prefill {pre:.0f} tok/s",
                      flush=True)
    return rows


# --------------------------------------------------------------------------- end to end on the GPU

# OLMoE-1B-7B-0924's shape: 16 layers, D=2048, 64 experts, top-8, I=1024, 16 heads, vocab 50304.
OLMOE_1B_7B = dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_experts=64,
                   num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=16, vocab_size=50304)


def olmoe_pair(device: torch.device, shape: dict[str, int] = OLMOE_1B_7B, *, tmp_dir: str | None = None):
    """transformers' OlmoeForCausalLM with random bf16 weights made on `device`, and the same weights
    loaded by moeinfer (through a checkpoint in `tmp_dir`, e.g. /dev/shm: RAM, no disk)."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    import moeinfer

    cfg = OlmoeConfig(**shape)
    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):  # random init straight on the device
                hf = OlmoeForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(previous)
        hf.save_pretrained(tmp)
        model = moeinfer.load(tmp, device=str(device), dtype="bfloat16")
    return hf, model


def bench_e2e(device: torch.device, new_tokens: int, *, shape: dict[str, int] = OLMOE_1B_7B,
              bandwidth: float | None = None, tmp_dir: str | None = None,
              allow_cpu: bool = False, pair: tuple[Any, Any] | None = None) -> list[dict[str, Any]]:
    """Batch-1 decode of an OLMoE-1B-7B-shaped model with random weights: moeinfer (triton kernel,
    CUDA-graph decode) vs transformers generate on the same weights, and % of the roofline.
    `allow_cpu`: the dry run of benchmarks/gpu_suite.py (tiny `shape`, Triton's interpreter, no graph);
    `pair`: (transformers model, moeinfer model) already made by `olmoe_pair`."""
    if device.type != "cuda" and not allow_cpu:
        raise SystemExit("--part e2e needs --device cuda")
    from moeinfer.kernels import use_kernel_

    bandwidth = bandwidth or measure_bandwidth(device)
    hf, model = pair or olmoe_pair(device, shape, tmp_dir=tmp_dir)
    use_kernel_(model, "triton")
    prompt = list(range(10, 26))
    params = model.num_parameters()
    bytes_per_token = params["active"] * 2  # bf16 weights read once per token at batch 1
    rows = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        ours = moeinfer_decode_rate(model, prompt, new_tokens)  # on_token reads each token: synchronised
        ids = torch.tensor([prompt], device=device)
        theirs = transformers_decode_rate(hf, ids, new_tokens, sync=sync)
    roofline = bandwidth / bytes_per_token
    impl = getattr(hf.config, "_experts_implementation", None)
    for name, rate in (("moeinfer triton + CUDA graph", ours), (f"transformers generate (experts: {impl})", theirs)):
        rows.append(dict(system=name, decode_tok_s=rate, pct_roofline=100 * rate / roofline))
        print(f"  {name}: {rate:.1f} tok/s ({100 * rate / roofline:.0f}% of the {roofline:.0f} tok/s roofline)")
    return [dict(measured_bandwidth_bytes_s=bandwidth, bytes_per_token=bytes_per_token)] + rows


def markdown(part: str, rows: list[dict[str, Any]]) -> str:
    """The rows as the markdown tables of docs/benchmarks.md, ratios against baselines of this run."""
    lines = []
    if part == "cpu-model":
        lines += ["| dtype | system | decode tok/s (best round) | vs best transformers | decode, median round | "
                  "vs best transformers | prefill tok/s | vs best transformers |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            group = [r for r in rows if r["dtype"] == dtype]
            hf = [r for r in group if r["system"].startswith("transformers")]
            best_dec = max((r["decode_tok_s"] for r in hf), default=float("nan"))
            best_med = max((r.get("decode_tok_s_median_round", float("nan")) for r in hf), default=float("nan"))
            best_pre = max((r["prefill_tok_s"] for r in hf), default=float("nan"))
            for r in group:
                med = r.get("decode_tok_s_median_round", float("nan"))
                lines.append(f"| {dtype} | {r['system']} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / best_dec:.2f}x "
                             f"| {med:.1f} | {med / best_med:.2f}x "
                             f"| {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / best_pre:.2f}x |")
    elif part == "layer":
        meta, data = rows[0], rows[1:]
        lines += [f"Measured: copy bandwidth {meta['measured_bandwidth_bytes_s'] / 1e9:.1f} GB/s, dense matmul "
                  f"{meta['measured_matmul_flops'] / 1e12:.3f} TFLOP/s.", "",
                  "| shape | tokens | backend | time (us) | vs best transformers | GB/s (% of copy) | % of matmul |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for key in dict.fromkeys((r["shape"], r["tokens"]) for r in data):
            group = [r for r in data if (r["shape"], r["tokens"]) == key]
            best_hf = min((r["seconds"] for r in group if r["backend"].startswith("transformers")), default=float("nan"))
            for r in group:
                lines.append(f"| {r['shape']} | {r['tokens']} | {r['backend']} | {r['seconds'] * 1e6:.0f} "
                             f"| {best_hf / r['seconds']:.2f}x | {r['gb_s']:.1f} ({r['pct_bandwidth']:.0f}%) "
                             f"| {r['pct_matmul']:.1f} |")
    else:
        lines += ["| system | decode tok/s | % of roofline |", "|---|---:|---:|"]
        lines += [f"| {r['system']} | {r['decode_tok_s']:.1f} | {r['pct_roofline']:.0f} |" for r in rows[1:]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["layer", "cpu-model", "e2e"], required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="CPU timings: wall time, or process CPU time (use with --threads 1 on a shared machine)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="interleaved decode rounds of --part cpu-model (best "
                   "round reported, median beside it)")
    p.add_argument("--tokens", type=int, nargs="*", help="token counts for --part layer")
    p.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/moe_<part>_<device>.json)")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if args.threads != 1 or device.type != "cpu":
            p.error("--clock cpu needs --threads 1 and --device cpu (CPU time of several threads counts spinning)")
        global CLOCK
        CLOCK = time.process_time
    env = environment(device)
    env["clock"] = args.clock
    print(json.dumps(env, indent=1))
    if args.part == "layer":
        scale = 1 if device.type == "cuda" else CPU_SCALE
        tokens = tuple(args.tokens or (GPU_TOKENS if device.type == "cuda" else CPU_TOKENS))
        rows = bench_layer(device, getattr(torch, args.dtype), tokens, scale)
    elif args.part == "cpu-model":
        rows = bench_cpu_model(args.threads, args.new_tokens, args.rounds)
    else:
        rows = bench_e2e(device, args.new_tokens)
    env["load_average_after"] = load_average()
    out = args.out or RESULTS / f"moe_{args.part}_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(environment=env, rows=rows), indent=1) + "\n")
    tmp.rename(out)
    print(f"wrote {out}")
    print(markdown(args.part, rows))


if __name__ == "__main__":
    main()
