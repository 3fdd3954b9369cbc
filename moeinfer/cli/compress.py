"""`moeinfer compress`: apply a compression recipe to a checkpoint and save the result.

    moeinfer compress --model tiny --recipe recipe.yaml --out tiny-int4
    moeinfer compress --model tiny --recipe prune_frequency --set keep=6 --out tiny-e6
    moeinfer compress --list
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.cli import add_model_args

    p = sub.add_parser("compress", help="prune / merge / quantize / low-rank a checkpoint", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--recipe", "-r", default=None, help="recipe YAML file, or one method's name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="parameter of a one-method recipe (repeatable; values parsed as YAML)")
    p.add_argument("--out", "-o", default=None,
                   help="output checkpoint directory: new or empty (written atomically; see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it already holds a checkpoint (never any other non-empty directory)")
    p.add_argument("--calibration", default=None,
                   help="calibration source: heldout (default), english, python, a text file, or a trace .npz")
    p.add_argument("--calibration-tokens", type=int, default=None, help="calibration tokens (default 4096)")
    p.add_argument("--save-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved floating-point tensors (default: the input checkpoint's)")
    p.add_argument("--list", action="store_true", help="list the compression methods and exit")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _recipe(args: argparse.Namespace):
    import dataclasses

    import yaml

    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.compress.api import as_recipe
    from moeinfer.compress.recipe import Recipe

    recipe = as_recipe(args.recipe)
    if args.set:
        if len(recipe.steps) != 1:
            raise ValueError("--set applies to a one-method recipe; put parameters in the recipe file instead")
        params = dict(recipe.steps[0].params)
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--set {item!r}: expected KEY=VALUE")
            params[key] = yaml.safe_load(value)
        recipe = Recipe.of({"method": recipe.steps[0].method, **params}, name=recipe.name,
                           calibration=recipe.calibration)
    calib = recipe.calibration
    if args.calibration:
        calib = dataclasses.replace(calib, source=args.calibration)
    if args.calibration_tokens:
        calib = dataclasses.replace(calib, max_tokens=args.calibration_tokens)
    return dataclasses.replace(recipe, calibration=calib)


def run(args: argparse.Namespace) -> int:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.compress.registry import available_methods, get_method

    if args.list:
        for name in available_methods():
            m = get_method(name)
            print(f"{name:24s} needs {m.needs:12s} {m.doc.splitlines()[0] if m.doc else ''}")
        return 0
    if not args.recipe or not args.out:
        raise ValueError("compress needs --recipe and --out (or --list)")
    recipe = _recipe(args)  # validated before the model is loaded

    import torch

    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.api import save
    from moeinfer.models import resolve_model_path
    from moeinfer.cli import load_model
    from moeinfer.compress.api import cast_floating_, compress_, weight_bytes
    from moeinfer.loading.checkpoint import read_config
    from moeinfer.loading.save import check_checkpoint_dest

    if args.dtype is None and str(args.device).startswith("cpu"):
        args.dtype = "float32"  # calibrate and quantize in fp32 on CPUs (bf16 matmul is slow there)
    source_dir = resolve_model_path(args.model)
    check_checkpoint_dest(args.out, overwrite=args.overwrite, source=source_dir)  # before minutes of work
    source = read_config(source_dir)
    save_dtype = args.save_dtype or source.get("dtype") or source.get("torch_dtype") or "float32"
    model = load_model(args)
    report = compress_(model, recipe, progress=not args.no_progress)
    cast_floating_(model, getattr(torch, save_dtype))
    out = save(model, args.out, overwrite=args.overwrite)
    print(json.dumps({"out": str(out), "hf_loadable": report.hf_loadable, "dtype": save_dtype,
                      "weight_bytes_saved": weight_bytes(model),
                      "steps": [{"method": s["method"], "summary": s["summary"]} for s in report.steps]}, indent=1))
    return 0
