"""Quality cost of graceful degradation: held-out bits per byte with 0, 1, 2 and 4 experts masked in
every MoE layer (tokens rerouted to their next-best available experts, moeinfer.engine.faults).

Which experts fail matters, so two choices are measured: the most used experts of each layer
(worst case, by routing counts on the evaluated text's first bytes) and seeded random ones.
Writes JSON; the table goes into docs/serving.md.

    .venv/bin/python benchmarks/bench_fault_quality.py --model tiny --max-bytes 200000
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

import moeinfer
from moeinfer.engine.faults import ExpertFaults, ExpertLoad
from moeinfer.eval import evaluate


def hottest(model, text: str, k: int) -> dict[int, list[int]]:
    load = ExpertLoad(model)
    ids = torch.tensor([model.tokenizer.encode(text[:20000])[:512]])
    with torch.inference_mode():
        model(ids)
    for block in model.moe_blocks():
        block.observer = None
    return {layer: counts.argsort()[::-1][:k].tolist() for layer, counts in load.counts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--masked", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--datasets", nargs="+", default=["english", "python"])
    ap.add_argument("--max-bytes", type=int, default=200_000)
    ap.add_argument("--dtype", default="float32", help="weights dtype (fp32 is fastest on CPUs without bf16)")
    ap.add_argument("--choices", nargs="+", default=["hottest", "random"], choices=["hottest", "random"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/fault-quality.json")
    args = ap.parse_args()

    rows = []
    for dataset in args.datasets:
        from moeinfer.eval.datasets import load_dataset

        text = load_dataset(dataset).text
        for choice in args.choices:
            for k in args.masked:
                if k == 0 and choice == "random":
                    continue
                model = moeinfer.load(args.model, dtype=args.dtype, progress=False)
                E = model.config.num_experts
                if k > E - model.config.top_k:
                    continue
                rng = random.Random(args.seed)
                picks = (hottest(model, text, k) if choice == "hottest"
                         else {b.layer_idx: rng.sample(range(E), k) for b in model.moe_blocks()})
                faults = ExpertFaults(model)
                for layer, experts in picks.items():
                    for e in experts:
                        faults.mask(layer, e)
                r = evaluate(model, dataset, max_bytes=args.max_bytes, progress=False)
                rows.append(dict(dataset=dataset, choice=choice, masked_per_layer=k,
                                 bits_per_byte=r.bits_per_byte, degraded_tokens=faults.degraded_tokens,
                                 scored_tokens=r.tokens))
                print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "dtype": args.dtype, "max_bytes": args.max_bytes,
                                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
