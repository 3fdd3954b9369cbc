"""`moeinfer init`: write a random-weight checkpoint with a real model's shapes (no hub needed).

    moeinfer init --arch olmoe --layers 8 --out olmoe-half
    moeinfer init --shape Qwen3-30B-A3B --layers 2 --out qwen3-2l
    moeinfer init --arch mixtral --shape hidden_size=256,intermediate_size=512 --layers 2 --out tiny-mixtral
    moeinfer init --list
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a random-weight checkpoint with real shapes", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=None, help="olmoe, qwen3_moe, mixtral, deepseek_v2 or deepseek_v3")
    p.add_argument("--shape", default=None,
                   help="a preset (see --list), KEY=VALUE,... config.json overrides of the arch's preset, or both "
                        "(PRESET,KEY=VALUE,...)")
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    p.add_argument("--out", "-o", default=None, help="new checkpoint directory (must not exist or be empty)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "bf16", "float32", "fp32", "float16", "fp16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list the shape presets and exit")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.loading.shapes import ARCH_DEFAULT_SHAPE, SHAPES

    if args.list:
        default = {v: k for k, v in ARCH_DEFAULT_SHAPE.items()}
        for name, hf in SHAPES.items():
            print(f"{name:18s} {hf['model_type']:12s} {hf['num_hidden_layers']} layers, hidden {hf['hidden_size']}, "
                  f"vocab {hf['vocab_size']}" + (f"  (default for --arch {default[name]})" if name in default else ""))
        return 0
    if not args.out:
        raise ValueError("--out is required")
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.loading.random_init import init_checkpoint

    path = init_checkpoint(args.out, arch=args.arch, shape=args.shape, layers=args.layers, dtype=args.dtype,
                           seed=args.seed, progress=not args.no_progress)
    print(path)
    return 0
