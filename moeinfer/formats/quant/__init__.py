"""Group-wise weight quantization for compressed experts and linear layers.

Shapes: R rows (output features), C columns (input features, the quantized axis), G groups per
row = ceil(C / group_size), P packed bytes per row = ceil(C / 8) * bits.

- `packing`: int8/int4/int3/int2 codes <-> uint8 storage (8 codes per `bits` bytes);
- `groupwise`: asymmetric group-wise quantize/dequantize and round-to-nearest (RTN);
- `hqq`: HQQ's half-quadratic zero-point optimisation (Badri & Shaji, 2023), no calibration data.
"""

from __future__ import annotations

from moeinfer.formats.quant.groupwise import (SUPPORTED_BITS, QuantizedTensor, check_bits, dequantize,
                                               num_groups, quantize)
from moeinfer.formats.quant.packing import pack, packed_cols, unpack

__all__ = ["SUPPORTED_BITS", "QuantizedTensor", "check_bits", "dequantize", "num_groups", "pack",
           "packed_cols", "quantize", "unpack"]
