"""Native CPU kernels (C++, torch's intra-op thread pool): batch-1 MoE expert stage in bf16/fp32 and in
packed int8/int4 codes, dense GEMV, the quantized GEMM (int8 activation rows x packed codes) and the
quantized experts' prefill built on it, and tile dequantization for fp32-activation prefill. See
csrc/ops.cpp for the algorithm and docs/kernels.md for the measurements behind it.

Lazy and optional: nothing is loaded at import. `load()` loads the library built by
`python -m moeinfer.kernels.native build` (`make install` runs it) on first use; when it is missing,
stale or fails to load, callers get None, a single warning says why, and the torch paths run.

Variants (VARIANTS) are instruction sets of the inner loops, chosen at run time by `best_variant()`
and selectable by hand (`variant=` on every op); `why_not(variant)` says why a CPU cannot run one.
"""

from __future__ import annotations

import warnings
from typing import Any

# portable C++; AVX2 + FMA + F16C; that + AVX-512 F/BW/VL/VNNI; that + AMX-TILE/AMX-INT8 (prefill GEMM)
VARIANTS = ("generic", "avx2", "avx512", "amx")
_state: dict[str, Any] = {}


def load() -> Any | None:
    """torch.ops.moeinfer_native, or None (with one warning) when the library cannot be used."""
    if "ops" in _state:
        return _state["ops"]
    import torch

    # Imported here: the build helpers are needed only on first use, never at `import moeinfer`.
    from moeinfer.kernels.native.build import is_current, library_path

    ops, why = None, None
    path = library_path()
    if not path.exists():
        why = f"{path} is not built (run `python -m moeinfer.kernels.native build` or `make install`)"
    elif not is_current():
        why = f"{path} is older than its sources or this torch (rebuild: `python -m moeinfer.kernels.native build`)"
    else:
        try:
            torch.ops.load_library(str(path))
            ops = torch.ops.moeinfer_native
        except (OSError, RuntimeError) as err:
            why = f"loading {path} failed: {err}"
    if why is not None:
        warnings.warn(f"moeinfer native CPU kernels unavailable, using the torch paths: {why}", RuntimeWarning,
                      stacklevel=2)
    _state["ops"], _state["why"] = ops, why
    return ops


def unavailable_reason() -> str | None:
    """Why the native library cannot be used (None when it can); loads it if not tried yet."""
    load()
    return _state["why"]


def why_not(variant: str) -> str | None:
    """None when this CPU and build can run `variant`; otherwise the reason."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown native variant {variant!r}; valid: {', '.join(VARIANTS)}")
    ops = load()
    if ops is None:
        return _state["why"]
    if not ops.built(variant):
        return (f"variant {variant!r} is not in this build: the compiler rejected its flags when the library "
                f"was built (`python -m moeinfer.kernels.native build` says why)")
    if not ops.supports(variant):
        return f"this CPU lacks the instructions of variant {variant!r}"
    return None


def best_variant() -> str | None:
    """The fastest variant this CPU runs, or None when the library is unavailable."""
    if "best" not in _state:
        _state["best"] = next((v for v in reversed(VARIANTS) if why_not(v) is None), None)
    return _state["best"]


def use_variant(variant: str | None) -> None:
    """Make `variant` what best_variant() returns from now on in this process, so every op left to choose
    runs it (checked as resolve_variant checks: a ValueError naming why this CPU cannot); None: back to
    the fastest this CPU runs. For comparing variants on a whole model (bench_cpu_real.py's
    `--systems moeinfer@avx2,moeinfer@avx512`); set it before preparing a model."""
    _state.pop("best", None)
    if variant is not None:
        _state["best"] = resolve_variant(variant)


def resolve_variant(variant: str | None) -> str:
    """`variant` checked (ValueError naming the reason when this CPU cannot run it), or the best one."""
    if variant is None:
        best = best_variant()
        if best is None:
            raise RuntimeError(f"native kernels unavailable: {_state['why']}")
        return best
    why = why_not(variant)
    if why is not None:
        raise ValueError(f"native variant {variant!r} cannot run here: {why}")
    return variant
