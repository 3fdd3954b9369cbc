"""Quality of the native quantized CPU decode with int8 activations (Q8_0-style blocks of 32,
moeinfer/kernels/quantized_cpu.py) against fp32 activations, on the shipped reference model.

For each preset: load moeinfer-tiny in fp32, `compress_` it, force every forward through the per-token
decode kernel (DECODE_SLOTS_PER_EXPERT raised, so evaluation windows run the code a decode step runs
instead of the prefill path), then bits per byte on the first `--max-bytes` of each held-out text with
`cpu_activations` "f32" and "q8" (moeinfer.eval.evaluate, as docs/compression.md measures quality).

    .venv/bin/python benchmarks/quality_q8_activations.py --presets q4_0,q8_0 --max-bytes 20000
"""

from __future__ import annotations

import argparse
import json

import moeinfer
from moeinfer.compress.api import compress_
from moeinfer.eval import evaluate
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.kernels import quantized_cpu


def set_activations(model, activations: str) -> None:
    for m in model.modules():
        if isinstance(m, QuantizedExperts):
            m.cpu_activations = activations


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="q4_0,q8_0")
    p.add_argument("--datasets", default="english,python")
    p.add_argument("--max-bytes", type=int, default=20000)
    p.add_argument("--model", default="tiny")
    args = p.parse_args()
    quantized_cpu.DECODE_SLOTS_PER_EXPERT = 10**9  # every forward takes the decode kernel
    quantized_cpu.Q8_DECODE_SLOTS_PER_EXPERT = 10**9  # (both activation forms)
    rows = []
    print("| preset | dataset | bpb f32 activations | bpb q8 activations | delta (%) |")
    print("|---|---|---|---|---|")
    for preset in args.presets.split(","):
        model = moeinfer.load(args.model, dtype="float32", progress=False)
        compress_(model, preset, progress=False)
        for ds in args.datasets.split(","):
            bpb = {}
            for acts in ("f32", "q8"):
                set_activations(model, acts)
                bpb[acts] = evaluate(model, ds, max_bytes=args.max_bytes, progress=False).bits_per_byte
            delta = 100 * (bpb["q8"] / bpb["f32"] - 1)
            rows.append(dict(preset=preset, dataset=ds, **{f"bpb_{k}": v for k, v in bpb.items()}, delta_pct=delta))
            print(f"| {preset} | {ds} | {bpb['f32']:.4f} | {bpb['q8']:.4f} | {delta:+.3f} |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
