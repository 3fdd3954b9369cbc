"""CPU kernel micro-benchmark: one OLMoE-1B-7B MoE layer (D=2048, I=1024, E=64, K=8), batch-1 decode
and a few prefill sizes, bf16 / int8 / int4 / q8_0 / q4_0 experts, old path vs new, beside the
machine's read bandwidth measured in the same run.

    python benchmarks/bench_cpu_kernels.py                    # 2 threads (torch default), wall clock
    python benchmarks/bench_cpu_kernels.py --tokens 1 --formats bf16,q4_0
    python benchmarks/bench_cpu_kernels.py --threads 1 --clock cpu --tokens 128 --formats int4,q4_0,int8,q8_0 \
        --linear 128                                          # prefill; plus the LM head's QuantizedLinear

Paths: bf16 "old" = the cpu kernel's torch ops (K matvec pairs at one token, `engine="torch"`);
"new" = the native call (all K experts in one, `engine=None`); prefill runs the cpu kernel's
widened schedule for both. Quantized "old" = QuantizedExperts.eager_forward (dequantize routed
experts each step); "new" = QuantizedExperts.forward (moeinfer/kernels/quantized_cpu.py) with fp32
activations (`cpu_activations="f32"`); "q8" = the same with int8 activations (Q8_0-style blocks of 32,
integer dot products; the default where the group size allows; prefill: the tiled integer GEMM
`moe_prefill_q`), timed in the same run. Decode GB/s and % roofline are of the fastest new path.

`--linear ROWS`: also one QuantizedLinear of the LM head's shape (2048 -> 50304) per quantized format at
ROWS rows: "old" = eager_forward (the whole weight dequantized, one fp32 matmul: what every call above 8
rows did before the native GEMM), "new" = forward with fp32 activations (the row kernels; "-" above 8
rows, where it dequantizes too), "q8" = forward with int8 activations (`gemm_q`).

Bandwidth (the roofline): the best of (a) a read-only reduction over 512 MiB (torch.sum), (b) torch's
fp32 matrix-vector product over a 512 MiB matrix, (c) the native fp32 GEMV over the same matrix,
(d) a tensor copy (read + write bytes); each best of a few repetitions. Decode GB/s = bytes the token
must read (its K experts' stored weights: codes, scales and zeros) / time; "% roofline" against
the best bandwidth. Memory: the bf16 layer (805 MB) plus one quantized copy at a time (< 3 GB).
Results: benchmarks/results/cpu_kernels.json and markdown on stdout. Numbers from a shared, busy
machine are indicative only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_moe import RESULTS, environment, time_fn  # noqa: E402  (one timing helper for all benchmarks)

import bench_moe  # noqa: E402
from moeinfer.formats.quantized_experts import QuantizedExperts  # noqa: E402
from moeinfer.formats.quantized_linear import QuantizedLinear  # noqa: E402
from moeinfer.cpuinfo import cpu_flags  # noqa: E402
from moeinfer.kernels import native  # noqa: E402
from moeinfer.kernels.cpu import cpu_moe  # noqa: E402
from moeinfer.kernels.quantized_cpu import LINEAR_MAX_ROWS, decode_activations  # noqa: E402
from moeinfer.model.moe import Routing  # noqa: E402

SHAPE = dict(D=2048, I=1024, E=64, K=8)
LM_HEAD = (2048, 50304)  # in, out features of OLMoE-1B-7B's LM head
FORMATS = {  # name -> (bits, group size, algorithm); None = bf16 stacked experts
    "bf16": None, "int8": (8, 128, "rtn"), "int4": (4, 128, "rtn"), "q8_0": (8, 32, "sym"), "q4_0": (4, 32, "sym"),
}
CPU = torch.device("cpu")


def simd_flags() -> list[str]:
    """The CPU flags that decide which kernels run (moeinfer.cpuinfo.cpu_flags, filtered)."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx", "fma", "f16c", "amx", "sse4", "vnni")))


def read_bandwidth(reps: int) -> dict[str, float]:
    """Bytes/s of the read-bound methods in the module docstring (best of `reps` each)."""
    def best(fn, nbytes: int) -> float:
        fn()
        t = min(_timed(fn) for _ in range(reps))
        return nbytes / t

    big = torch.ones(128 << 20)  # 512 MiB fp32
    mat = big.view(64 << 10, 2048)
    vec = torch.ones(2048)
    out = {"torch_sum": best(lambda: big.sum(), big.numel() * 4),
           "torch_fp32_gemv": best(lambda: mat @ vec, mat.numel() * 4)}
    if native.best_variant() is not None:
        ops, v = native.load(), native.best_variant()
        out["native_fp32_gemv"] = best(lambda: ops.gemv(vec, mat, v), mat.numel() * 4)
    half = big[: 64 << 20]
    dst = torch.empty_like(half)
    out["torch_copy_rw"] = best(lambda: dst.copy_(half), 2 * half.numel() * 4)
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _with_activations(qe: QuantizedExperts, activations: str, x: torch.Tensor, r: Routing) -> torch.Tensor:
    qe.cpu_activations = activations
    try:
        return qe(x, r)
    finally:
        qe.cpu_activations = None


def make_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bf16 experts, generated expert by expert (no fp32 copy of the layer)."""
    D, I, E = SHAPE["D"], SHAPE["I"], SHAPE["E"]
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.empty(E, 2 * I, D, dtype=torch.bfloat16)
    down = torch.empty(E, D, I, dtype=torch.bfloat16)
    for e in range(E):
        gate_up[e] = torch.randn(2 * I, D, generator=g) / D**0.5
        down[e] = torch.randn(D, I, generator=g) / I**0.5
    return gate_up, down


def make_routing(N: int, seed: int = 1) -> Routing:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, SHAPE["E"], generator=g)
    w, idx = logits.softmax(-1).topk(SHAPE["K"], dim=-1)
    return Routing(indices=idx, weights=w / w.sum(-1, keepdim=True), logits=logits)


def decode_bytes(fmt: str, gate_up: torch.Tensor, qe: QuantizedExperts | None) -> float:
    """Bytes one token reads: its K experts' stored weights."""
    if qe is None:
        return SHAPE["K"] * 3 * SHAPE["D"] * SHAPE["I"] * gate_up.element_size()
    return SHAPE["K"] * sum(p.numel() * p.element_size() for p in qe.parameters()) / SHAPE["E"]


def bench_linear(args: argparse.Namespace) -> list[dict]:
    """The `--linear` table of the module docstring."""
    C, O = LM_HEAD
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(C, O, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(O, C, generator=g) / C**0.5)
    rows = []
    print(f"\n| QuantizedLinear {C}->{O} | rows | old ms | new ms | q8 ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for fmt in args.formats.split(","):
        if FORMATS[fmt] is None:
            continue
        bits, gs, alg = FORMATS[fmt]
        m = QuantizedLinear.from_linear(lin, bits=bits, group_size=gs, algorithm=alg)
        x = torch.randn(args.linear, C, generator=g).bfloat16()

        def with_acts(acts: str | None):
            m.cpu_activations = acts
            return m(x)

        with torch.no_grad():
            t_old = time_fn(lambda: m.eager_forward(x), CPU, warmup=1, reps=args.reps, budget_s=args.budget)
            t_new = (time_fn(lambda: with_acts("f32"), CPU, warmup=1, reps=args.reps, budget_s=args.budget)
                     if args.linear <= LINEAR_MAX_ROWS else None)
            t_q8 = (time_fn(lambda: with_acts("q8"), CPU, warmup=1, reps=args.reps, budget_s=args.budget)
                    if decode_activations(None, gs) == "q8" else None)
        best = min(t for t in (t_new, t_q8) if t is not None) if (t_new or t_q8) else None
        rows.append(dict(format=fmt, shape=[C, O], rows=args.linear, old_s=t_old, new_s=t_new, q8_s=t_q8))
        cells = [f"{t * 1e3:.1f}" if t else "-" for t in (t_old, t_new, t_q8)]
        spd = f"{t_old / best:.1f}x" if best else "-"
        print(f"| {fmt} | {args.linear} | {' | '.join(cells)} | {spd} |", flush=True)
        del m
    return rows


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    env = environment(CPU)
    env.update(cpu_flags=simd_flags(), native_variant=native.best_variant(),
               native_unavailable=native.unavailable_reason())
    bw = read_bandwidth(args.bw_reps)
    roof = max(bw.values())
    print(f"# CPU kernels, one OLMoE-1B-7B MoE layer {SHAPE}, {args.threads} threads")
    print(f"cpu: {env['hardware']['cpu']}; flags: {' '.join(env['cpu_flags'])}; native: {env['native_variant']}")
    print("read bandwidth (GB/s): " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bw.items())
          + f"; roofline = best = {roof / 1e9:.1f}")
    gate_up, down = make_layer()
    rows = []
    print("\n| format | tokens | old ms | new ms | q8 ms | speed-up | new GB/s (decode) | % roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt in args.formats.split(","):
        spec = FORMATS[fmt]
        qe = None
        if spec is not None:
            bits, gs, alg = spec
            t0 = time.perf_counter()
            qe = QuantizedExperts.from_float(gate_up, down, [bits] * SHAPE["E"], group_size=gs, algorithm=alg)
            print(f"<!-- quantized {fmt} in {time.perf_counter() - t0:.0f} s -->")
        for N in args.tokens:
            r = make_routing(N)
            x = torch.randn(N, SHAPE["D"], generator=torch.Generator().manual_seed(2)).bfloat16()
            with torch.no_grad():
                if qe is None:
                    old = lambda: cpu_moe(x, r.indices, r.weights, gate_up, down, engine="torch")  # noqa: E731
                    new = lambda: cpu_moe(x, r.indices, r.weights, gate_up, down)  # noqa: E731
                else:
                    old = lambda: qe.eager_forward(x, r)  # noqa: E731
                    new = lambda: _with_activations(qe, "f32", x, r)  # noqa: E731
                t_new = time_fn(new, CPU, warmup=2, reps=args.reps, budget_s=args.budget)
                t_q8 = None
                if qe is not None and decode_activations(None, qe.group_size) == "q8":
                    t_q8 = time_fn(lambda: _with_activations(qe, "q8", x, r), CPU, warmup=2, reps=args.reps,
                                   budget_s=args.budget)
                t_old = (time_fn(old, CPU, warmup=1, reps=args.reps, budget_s=args.budget)
                         if N <= args.old_max_tokens else None)
            row = dict(format=fmt, tokens=N, old_s=t_old, new_s=t_new, q8_s=t_q8)
            best = min(t for t in (t_new, t_q8) if t is not None)
            if N == 1:
                nbytes = decode_bytes(fmt, gate_up, qe)
                row.update(bytes=nbytes, new_GBps=nbytes / best / 1e9, roofline_frac=nbytes / best / roof)
            rows.append(row)
            gbps = f"{row['new_GBps']:.1f}" if N == 1 else "-"
            frac = f"{100 * row['roofline_frac']:.0f}%" if N == 1 else "-"
            old_ms = f"{t_old * 1e3:.2f}" if t_old else "-"
            spd = f"{t_old / best:.1f}x" if t_old else "-"
            q8_ms = f"{t_q8 * 1e3:.2f}" if t_q8 else "-"
            print(f"| {fmt} | {N} | {old_ms} | {t_new * 1e3:.2f} | {q8_ms} | {spd} | {gbps} | {frac} |", flush=True)
        del qe
    linear = bench_linear(args) if args.linear else []
    env["load_average_after"] = bench_moe.load_average()
    env["clock"] = args.clock
    return dict(environment=env, shape=SHAPE, bandwidth_Bps=bw, roofline_Bps=roof, rows=rows, linear=linear)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=[1, 16, 128, 512])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--bw-reps", type=int, default=5)
    p.add_argument("--budget", type=float, default=5.0, help="seconds per timed path at most (>= 3 calls)")
    p.add_argument("--old-max-tokens", type=int, default=128, help="skip the old path above this many tokens")
    p.add_argument("--linear", type=int, default=0, metavar="ROWS",
                   help="also time the LM head's QuantizedLinear at ROWS rows (module docstring)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or process CPU time (with --threads 1 on a shared machine)")
    p.add_argument("--out", type=Path, default=RESULTS / "cpu_kernels.json")
    args = p.parse_args()
    if args.clock == "cpu":
        if args.threads != 1:
            p.error("--clock cpu needs --threads 1 (CPU time of several threads counts spinning)")
        bench_moe.CLOCK = time.process_time
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
