"""Mixed-precision loading (HOBBIT, EdgeMoE): fetch a low-bit copy of an expert whose gate weight is low.

On a miss whose largest gate weight (over the tokens routed to the expert) is below
`OffloadConfig.low_bit_threshold`, the cache asks for the expert's low-bit copy: fewer bytes over the
link, a little accuracy lost on a token that weighs the expert lightly. A low-bit copy in the cache
serves later low-weight tokens; a high-weight token is a miss that reloads full precision into the
same slot (`ExpertCache`), and the hobbit policy evicts low-bit copies first.

1. `offload_` quantizes every expert with the compression package's group-wise integer quantizer
   (moeinfer.formats.quant.groupwise: asymmetric, one scale and zero per group) and writes the codes
   beside the full-precision store (`experts-LLL.q4g128.safetensors`);
2. a low-bit load reads the packed codes, scales and zeros (its bytes are what the cache and the
   simulator count) and dequantizes them into the fast-tier slot, so expert compute is unchanged.
The simulator models the same decisions with `low_bit_bytes` (`moeinfer simulate --low-bit T`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeinfer.formats.quant import groupwise
from moeinfer.offload.errors import OffloadError


@dataclass(frozen=True)
class LowBitCodec:
    """Group-wise integer quantization of one expert matrix [rows, cols]."""

    bits: int = 4
    group_size: int = 128

    @property
    def suffix(self) -> str:
        return f".q{self.bits}g{self.group_size}"

    def _fns(self) -> Any:
        return groupwise

    def quantize(self, w: torch.Tensor) -> Any:
        return self._fns().quantize(w, bits=self.bits, group_size=self.group_size)

    def dequantize(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, cols: int,
                   dtype: torch.dtype) -> torch.Tensor:
        return self._fns().dequantize(packed, scale, zero, bits=self.bits, group_size=self.group_size, cols=cols,
                                      dtype=dtype)


def find_codec(bits: int = 4, group_size: int = 128) -> LowBitCodec:
    """The codec, after checking the quantizer is there and accepts these settings."""
    codec = LowBitCodec(bits=bits, group_size=group_size)
    try:
        codec._fns().check_bits(bits)
    except ValueError as e:
        raise OffloadError(f"mixed-precision loading: {e}") from e
    if group_size < 1:
        raise OffloadError(f"mixed-precision loading: group size must be >= 1, got {group_size}")
    return codec


def low_bit_bytes(expert_bytes: int, *, bits: int = 4, group: int = 128, dtype_bytes: int = 2) -> int:
    """Bytes of a `bits`-bit group-wise copy (packed codes, fp32 scale and zero per group): the
    simulator's estimate when no store exists."""
    params = expert_bytes // dtype_bytes
    return params * bits // 8 + (params // group) * 8
