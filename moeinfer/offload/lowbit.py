"""Mixed-precision loading hook (HOBBIT, EdgeMoE): a low-bit copy of an expert for low gate weights.

The cache already decides per miss whether the low-bit copy serves (`OffloadConfig.low_bit_threshold`,
`ExpertCache` precision bookkeeping, the hobbit policy's precision dimension), and the simulator
counts its bytes (`low_bit_bytes`). The live path needs a group-wise integer quantizer from the
compression package (moeinfer.compress); `find_codec` returns it once one exists and otherwise
raises a clear error, so a live run never silently loads full precision instead.
"""

from __future__ import annotations

import importlib
from typing import Any

from moeinfer.offload.config import OffloadError

_CANDIDATES = (("moeinfer.compress.quant", "quantize_groupwise", "dequantize_groupwise"),
               ("moeinfer.compress.methods.quant", "quantize_groupwise", "dequantize_groupwise"))


def find_codec() -> tuple[Any, Any]:
    """(quantize, dequantize) functions from moeinfer.compress, or OffloadError when there are none."""
    for module, q, dq in _CANDIDATES:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, q) and hasattr(mod, dq):
            raise OffloadError(f"{module}.{q} exists but the offload store does not use it yet; "
                               "mixed-precision loading is simulated only (moeinfer simulate --low-bit)")
    raise OffloadError("mixed-precision loading needs a group-wise integer quantizer from moeinfer.compress, "
                       "which has none yet; the simulator models it (moeinfer simulate --low-bit)")


def low_bit_bytes(expert_bytes: int, *, bits: int = 4, group: int = 128, dtype_bytes: int = 2) -> int:
    """Bytes of a `bits`-bit group-wise copy: packed weights plus one scale per group."""
    params = expert_bytes // dtype_bytes
    return params * bits // 8 + (params // group) * dtype_bytes
