"""Which device a model may be loaded on, checked before any work, with a message saying what is wrong.

moeinfer runs on CPUs and CUDA GPUs. `torch.device` accepts many more names (`meta` holds no data, `mps`
and the other accelerators have no kernels here) and a `cuda` device that this machine does not have
fails only at the first allocation, deep inside loading; `parse_device` refuses those up front.
"""

from __future__ import annotations

import torch

SUPPORTED = ("cpu", "cuda")


def parse_device(device: torch.device | str) -> torch.device:
    """A usable torch.device for `device` ("cpu", "cuda", "cuda:1", ...), or a ValueError saying why not."""
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {str(device)!r} is not a device name; use one of: cpu, cuda, cuda:N") from None
    if dev.type not in SUPPORTED:
        why = "holds no data" if dev.type == "meta" else "has no kernels in moeinfer"
        raise ValueError(f"device {str(device)!r}: {dev.type} {why}; use one of: cpu, cuda, cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r}: CUDA is not available ({build}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s) "
                             f"(cuda:0..cuda:{count - 1})")
    return dev
