"""--kernel: which expert-stage kernel the loaded model runs (moeinfer.kernels.use_kernel_).

The CLI default is `auto` (the `cpu` kernel on CPUs, `triton` on CUDA when triton is installed,
else the reference); the Python API's default after `moeinfer.load` stays `reference`.
"""

from __future__ import annotations

import argparse
from typing import Any

from moeinfer.kernels.registry import CHOICES


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", default="auto", choices=CHOICES,
                   help="MoE expert kernel (default: auto = cpu on CPU, triton on CUDA if installed)")
    p.add_argument("--kernel-fp32-weights", action="store_true",
                   help="compute the experts of a bf16/fp16 model from an fp32 copy of their weights "
                        "(faster on CPUs without bf16 matmul; +2x expert weight memory)")
    p.add_argument("--cpu-linears", action="store_true",
                   help="also run the dense path on the native CPU kernels: the bf16 linears (attention, "
                        "shared expert, lm_head) and the RMSNorms (built by `make install`; an error when "
                        "they are not built)")


def apply_(model: Any, args: argparse.Namespace) -> Any:
    # Imported here: the CLI loads torch-heavy modules only when a subcommand runs (a fast --help).
    from moeinfer.kernels import use_kernel_

    return use_kernel_(model, args.kernel, fp32_weights=args.kernel_fp32_weights,
                       linears=getattr(args, "cpu_linears", False))
