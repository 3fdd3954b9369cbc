"""`python -m moeinfer.kernels.native build [--verbose]`: compile the native CPU kernels."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeinfer.kernels.native")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--allow-failure", action="store_true",
                        help="exit 0 when the build fails (the torch paths run instead)")
    args = parser.parse_args(argv)
    # Imported here: `--help` answers without importing torch.
    from moeinfer.kernels.native.build import build

    try:
        path = build(verbose=args.verbose)
    except RuntimeError as err:
        print(f"moeinfer: {err}", file=sys.stderr)
        print("moeinfer: the native CPU kernels are not built; the torch paths will run", file=sys.stderr)
        return 0 if args.allow_failure else 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
