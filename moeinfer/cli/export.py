"""`moeinfer export`: write a checkpoint in another system's format (GGUF: llama.cpp, Ollama, LM Studio).

    moeinfer export --model tiny --format gguf --out tiny-bf16.gguf
    moeinfer export --model tiny --quant q4_0 --out tiny-q4_0.gguf
    moeinfer compress --model tiny --recipe prune-25 --out tiny-p25 && \\
        moeinfer export --model tiny-p25 --quant q4_0 --out tiny-p25-q4_0.gguf

--quant auto keeps what the checkpoint has (its float dtype; experts quantized with the symmetric
group-32 scheme, presets q8_0/q4_0, as Q8_0/Q4_0 blocks without requantizing); q8_0/q4_0 quantize the
routed experts with that scheme; bf16/f16/f32 write every tensor in that float type.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.cli import DEFAULT_MODEL
    from moeinfer.loading.gguf.export import QUANT_CHOICES

    p = sub.add_parser("export", help="write a checkpoint as GGUF (llama.cpp)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"checkpoint directory, GGUF file or shipped model name (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="load the weights in this dtype first (default: the checkpoint's)")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="output format (default: gguf)")
    p.add_argument("--quant", default="auto", choices=QUANT_CHOICES, help="tensor types written (default: auto)")
    p.add_argument("--out", "-o", required=True, help="output file (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.api import export, load

    progress = not args.no_progress
    model = load(args.model, dtype=args.dtype, progress=progress)
    report = export(model, args.out, format=args.format, quant=args.quant, overwrite=args.overwrite,
                    progress=progress)
    counts = ", ".join(f"{n} {t}" for t, n in sorted(report.type_counts().items()))
    size = report.path.stat().st_size
    print(f"wrote {report.path} ({size / 2**20:.1f} MiB; tensors: {counts})")
    for note in report.notes:
        print(f"note: {note}")
    return 0
