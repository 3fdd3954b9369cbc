"""Every compression method side by side on the shipped reference model (docs/compression.md).

For each entry of a recipe table (benchmarks/compression_recipes.yaml): load moeinfer-tiny in fp32,
compress it (calibration collected once, from the tails of the held-out texts), then measure
- bits per byte on the first `--max-bytes` of both held-out domains (disjoint from calibration);
- weight bytes as stored (floating tensors at bf16, the checkpoint's dtype; packed ints as packed)
  and bits per expert parameter (expert storage bits / the original model's expert weights);
- experts computed per token (slots actually dispatched, counted on the English evaluation);
- batch-1 greedy decode tokens/s on this CPU, beside the uncompressed model measured in the same run.
Then the ordering claims of the papers are checked from the numbers, and a Pareto plot drawn.

    .venv/bin/python benchmarks/bench_compression.py            # all entries, ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_compression.py --only int4 --max-bytes 20000   # quick look
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

import moeinfer
from moeinfer.bench.hardware import cpu_name, git_commit, software_info
from moeinfer.compress.api import compress_
from moeinfer.compress.calibration import CalibrationConfig, collect
from moeinfer.engine.generate import generate
from moeinfer.eval import evaluate
from moeinfer.model.counters import RoutingCounter
from moeinfer.model.moe import Experts

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "KING HENRY. My lord,"


def weight_stats(model: Any, expert_weights: int) -> dict[str, Any]:
    """Bytes as a bf16 checkpoint stores them: floating tensors at 2 bytes, except quantization scales
    and zeros (`keep_float_dtype` modules keep fp32), packed integers as packed."""
    fp32 = {id(t) for m in model.modules() if getattr(m, "keep_float_dtype", False)
            for t in list(m.parameters()) + list(m.buffers())}
    seen: set[int] = set()
    total = expert = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or name.endswith("inv_freq"):
            continue
        seen.add(id(t))
        b = t.numel() * (2 if t.is_floating_point() and id(t) not in fp32 else t.element_size())
        total += b
        if ".experts." in name:
            expert += b
    return {"weight_bytes": total, "expert_bytes": expert, "expert_bits_per_param": 8 * expert / expert_weights}


def decode_rate(model: Any, tokens: int, repeats: int = 3) -> float:
    """Median batch-1 greedy decode tokens/s over `repeats` runs (after a warm-up)."""
    generate(model, [PROMPT], max_new_tokens=4)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        [out] = generate(model, [PROMPT], max_new_tokens=tokens, ignore_eos=True)
        rates.append(len(out.token_ids) / (time.perf_counter() - t))
    return sorted(rates)[len(rates) // 2]


def run_entry(entry: dict[str, Any], calibs: dict[str, Any], args: argparse.Namespace,
              expert_weights: int) -> dict[str, Any]:
    model = moeinfer.load(args.model, dtype="float32", progress=False)
    source = entry.get("calibration", "heldout")
    if source not in calibs:
        calibs[source] = collect(model, CalibrationConfig(source=source, max_tokens=args.calibration_tokens),
                                 progress=False)
    calib = calibs[source]
    report = None
    if entry.get("steps"):
        report = compress_(model, {"name": entry["name"], "steps": entry["steps"]}, calibration=calib,
                           progress=False)
    if entry.get("routing"):
        from moeinfer.model.gating import set_routing_

        set_routing_(model, entry["routing"])
    row: dict[str, Any] = {k: entry.get(k) for k in ("name", "family", "strength")}
    row.update(weight_stats(model, expert_weights))
    row["hf_loadable"] = None if report is None else report.hf_loadable
    if args.decode_only:  # keep the measured quality of an earlier run, re-time decode
        row.update({k: v for k, v in args.previous[entry["name"]].items() if k.startswith("bpb_")
                    or k == "experts_per_token"})
        row["decode_tok_s"] = decode_rate(model, args.decode_tokens)
        return row
    counter = RoutingCounter.attach(model)
    for dataset in args.datasets:
        r = evaluate(model, dataset, max_bytes=args.max_bytes, progress=False)
        row[f"bpb_{dataset}"] = r.bits_per_byte
        if dataset == args.datasets[0]:
            row["experts_per_token"] = counter.per_token()  # slots per token per MoE layer
    counter.remove()
    row["decode_tok_s"] = decode_rate(model, args.decode_tokens)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--recipes", default=str(ROOT / "benchmarks/compression_recipes.yaml"))
    ap.add_argument("--only", nargs="*", default=None, help="entry names to run (default: all)")
    ap.add_argument("--datasets", nargs="+", default=["english", "python"])
    ap.add_argument("--max-bytes", type=int, default=100_000)
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs/compression.json"))
    ap.add_argument("--decode-only", action="store_true",
                    help="re-time decode (and recount bytes) of every entry of --out, keeping its quality numbers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.decode_only:
        old = json.loads(Path(args.out).read_text())
        args.previous = {r["name"]: r for r in old["rows"]}
        args.max_bytes = old["max_bytes"]

    entries = yaml.safe_load(Path(args.recipes).read_text())["entries"]
    if args.only:
        entries = [e for e in entries if e["name"] in args.only or e["name"] == "baseline"]
    base = moeinfer.load(args.model, dtype="float32", progress=False)
    cfg = base.config
    expert_weights = sum(b.experts.gate_up_proj.numel() + b.experts.down_proj.numel()
                         for b in base.moe_blocks() if isinstance(b.experts, Experts))
    calibs = {"heldout": collect(base, CalibrationConfig(max_tokens=args.calibration_tokens), progress=False)}
    del base
    rows = []
    from tqdm.auto import tqdm

    for entry in tqdm(entries, desc="recipes", unit="recipe"):
        t = time.perf_counter()
        row = run_entry(entry, calibs, args, expert_weights)
        row["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        tqdm.write(json.dumps(row))
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": args.model,
              "model_shape": {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "experts": cfg.num_experts,
                              "top_k": cfg.top_k, "expert_inner": cfg.moe_intermediate_size},
              "device": cpu_name(), "threads": args.threads, "load_average_at_end": load,
              "software": software_info(), "commit": git_commit(ROOT), "max_bytes": args.max_bytes, "decode_tokens": args.decode_tokens,
              "calibration": {"source": "heldout", "tokens": calibs["heldout"].tokens}, "rows": rows}
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
