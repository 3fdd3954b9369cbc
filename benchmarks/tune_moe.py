"""Tune the fused Triton MoE's launch configuration per shape and token bucket on this device, and
write it as JSON data (the files moeinfer/kernels/configs.py reads; vLLM's benchmark_moe.py tunes
its fused_moe configs the same way).

    python benchmarks/tune_moe.py --shape mixtral qwen3 olmoe          # on a CUDA GPU, bf16
    python benchmarks/tune_moe.py --E 8 --I 14336 --D 4096 --top-k 2   # any shape
    TRITON_INTERPRET=1 python benchmarks/tune_moe.py --smoke           # CPU check of the script itself

Steps:
1. for each token bucket, random x and routing of the shape;
2. time fused_moe under every config of a small search space (timing helper of bench_moe.py,
   CUDA-graph replay for small buckets), keeping configs whose output matches the reference;
3. write {bucket: best config} to E={E},N={I},K={D},device_name={device}.json, via a temp file and
   a rename so a half-written file never exists.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_moe import LAYER_SHAPES, time_fn  # noqa: E402

from moeinfer.kernels.configs import CONFIG_DIR, KernelConfig, config_file_name, device_name  # noqa: E402

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SHAPE_KEYS = {"mixtral": "Mixtral-8x7B", "qwen3": "Qwen3-30B-A3B", "olmoe": "OLMoE-1B-7B"}


# Likely winners first (tried when --max-configs cuts the list): small N-tiles spread a decode's few
# weight rows over every multiprocessor; large M and N tiles with deep pipelines suit prefill.
DECODE_FIRST = [(16, 32, 128, 4, 4), (16, 16, 128, 4, 4), (16, 64, 128, 4, 4), (16, 32, 64, 4, 4),
                (16, 16, 256, 4, 3), (16, 32, 256, 4, 3)]
PREFILL_FIRST = [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3),
                 (128, 64, 64, 4, 4), (64, 128, 64, 8, 3)]


def search_space(tokens: int, top_k: int, num_experts: int) -> list[KernelConfig]:
    """Block sizes sensible for the slots per expert this bucket gives (small M for decode), the likely
    winners first."""
    per_expert = max(1, tokens * top_k // num_experts)
    block_ms = [16] if per_expert <= 16 else ([16, 32, 64] if per_expert <= 128 else [32, 64, 128])
    first = DECODE_FIRST if per_expert <= 16 else (PREFILL_FIRST if per_expert > 128 else [])
    grid = [(m, n, k, w, st) for m, n, k, w, st in itertools.product(block_ms, (16, 32, 64, 128), (64, 128), (4, 8),
                                                                     (2, 3, 4))
            if not (m >= 64 and n <= 32)]
    out: list[KernelConfig] = []
    for m, n, k, warps, stages in first + [c for c in grid if c not in first]:
        out.append(KernelConfig(block_m=m, block_n_gate_up=n, block_k_gate_up=k, block_n_down=n,
                                block_k_down=k, num_warps=warps, num_stages=stages))
    return out


def tune_shape(E: int, K: int, D: int, I: int, *, device: torch.device, dtype: torch.dtype,
               buckets: tuple[int, ...], max_configs: int | None) -> dict[str, dict[str, int]]:
    from moeinfer.kernels.fused_moe import fused_moe
    from moeinfer.kernels.reference import reference_moe

    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(E, 2 * I, D, generator=g) / D**0.5).to(device=device, dtype=dtype)
    down = (torch.randn(E, D, I, generator=g) / I**0.5).to(device=device, dtype=dtype)
    table = {}
    for tokens in buckets:
        # 1.
        x = torch.randn(tokens, D, generator=g).to(device=device, dtype=dtype)
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)]).to(device)
        w = torch.rand(tokens, K, generator=g).to(device)
        ref = reference_moe(x, idx, w, gate_up, down).float()
        tol = 3e-2 * float(ref.abs().max()) + 1e-6
        best: tuple[float, KernelConfig] | None = None
        # 2.
        for cfg in search_space(tokens, K, E)[:max_configs]:
            try:
                out = fused_moe(x, idx, w, gate_up, down, config=cfg)
                if float((out.float() - ref).abs().max()) > tol:
                    print(f"  {cfg}: wrong output, skipped")
                    continue
                t = time_fn(lambda cfg=cfg: fused_moe(x, idx, w, gate_up, down, config=cfg), device,
                            reps=10, cuda_graph=device.type == "cuda" and tokens <= 256)
            except Exception as e:  # out of shared memory, too many registers: not a candidate
                print(f"  {cfg}: failed ({type(e).__name__})")
                continue
            if best is None or t < best[0]:
                best = (t, cfg)
        if best is None:
            raise SystemExit(f"no config ran for E={E} N={I} K={D} tokens={tokens}")
        print(f"E={E} I={I} D={D} tokens={tokens}: {best[0] * 1e6:.1f} us with {best[1]}", flush=True)
        table[str(tokens)] = best[1].to_json()
    return table


def write_table(table: dict[str, dict[str, int]], path: Path) -> None:
    # 3.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    tmp.rename(path)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs="*", choices=sorted(SHAPE_KEYS), default=[])
    p.add_argument("--E", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--D", type=int)
    p.add_argument("--I", type=int)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--buckets", type=int, nargs="*", default=list(BUCKETS))
    p.add_argument("--max-configs", type=int, default=None, help="try only the first N configs per bucket")
    p.add_argument("--out-dir", type=Path, default=CONFIG_DIR)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shape, two buckets, three configs, fp32, written to a temp dir (CPU interpreter check)")
    args = p.parse_args()
    if args.smoke:
        import tempfile

        args.device, args.dtype, args.buckets, args.max_configs = "cpu", "float32", [1, 8], 3
        args.E, args.top_k, args.D, args.I, args.shape = 8, 2, 40, 24, []
        args.out_dir = Path(tempfile.mkdtemp(prefix="tune_moe_"))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = [LAYER_SHAPES[SHAPE_KEYS[s]] for s in args.shape]
    if args.E:
        shapes.append(dict(E=args.E, K=args.top_k, D=args.D, I=args.I))
    if not shapes:
        p.error("give --shape or --E/--top-k/--D/--I")
    for s in shapes:
        table = tune_shape(s["E"], s["K"], s["D"], s["I"], device=device, dtype=dtype,
                           buckets=tuple(args.buckets), max_configs=args.max_configs)
        write_table(table, args.out_dir / config_file_name(E=s["E"], N=s["I"], K=s["D"], device=device_name(device)))


if __name__ == "__main__":
    main()
