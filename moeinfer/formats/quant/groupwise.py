"""Asymmetric group-wise quantization: w ~ (q - z) * s, one scale s and zero z per group of
`group_size` consecutive input columns of a row; codes q in [0, 2^bits - 1], stored packed.

Shapes: [...] leading axes (experts, rows), C columns, G = ceil(C / group_size) groups, g group size.
A column count that `group_size` does not divide gets a shorter last group: the codes are stored
for exactly C columns (no padding on disk), and only the arithmetic pads.

`algorithm="sym"` is the symmetric scheme of ggml's Q8_0/Q4_0 (moeinfer.formats.quant.symmetric):
the same storage with a constant zero-point, so those weights round-trip to GGUF bit for bit.

Steps (`quantize`, asymmetric algorithms):
1. pad the columns to G * g by repeating the last column (min and max of the last group unchanged);
2. per group: s = (max - min) / (2^bits - 1) and z = round(-min / s) (round-to-nearest, RTN), or
   HQQ's optimised zero-point (moeinfer.formats.quant.hqq);
3. q = clamp(round(w / s + z), 0, 2^bits - 1), cut back to C columns and packed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeinfer.formats.quant.hqq import optimize_zero
from moeinfer.formats.quant.packing import pack, packed_cols, unpack_codes
from moeinfer.formats.quant.symmetric import quantize_symmetric

SUPPORTED_BITS = (2, 3, 4, 8)
ALGORITHMS = ("rtn", "hqq", "sym")
BLOCK_ELEMS = 1 << 22  # elements quantized at a time (fp32 temporaries of 16 MB)


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}; supported: {', '.join(map(str, SUPPORTED_BITS))}")
    return bits


def num_groups(cols: int, group_size: int) -> int:
    return -(-cols // group_size)


@dataclass
class QuantizedTensor:
    """A quantized [..., C] tensor: packed codes [..., P] uint8, scale and zero [..., G] float."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    cols: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.packed, self.scale, self.zero, bits=self.bits, group_size=self.group_size,
                          cols=self.cols, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))


def _pad_cols(w: torch.Tensor, total: int) -> torch.Tensor:
    extra = total - w.shape[-1]
    if extra == 0:
        return w
    return torch.cat([w, w[..., -1:].expand(*w.shape[:-1], extra)], dim=-1)


@torch.no_grad()
def quantize(w: torch.Tensor, *, bits: int, group_size: int, algorithm: str = "rtn") -> QuantizedTensor:
    """w [..., C] float -> QuantizedTensor (codes packed; scale/zero fp32). A tensor of more than
    BLOCK_ELEMS elements is quantized a block of rows at a time into preallocated outputs, so the fp32
    temporaries stay ~16 MB each whatever its size (rows are independent)."""
    check_bits(bits)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown quantization algorithm {algorithm!r}; available: {', '.join(ALGORITHMS)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    C = w.shape[-1]
    rows = w.numel() // max(C, 1)
    if w.numel() <= BLOCK_ELEMS or rows <= 1:
        return _quantize_rows(w, bits=bits, group_size=group_size, algorithm=algorithm)
    flat = w.reshape(rows, C)
    G = num_groups(C, group_size)
    packed = torch.empty(rows, packed_cols(C, bits), dtype=torch.uint8, device=w.device)
    scale = torch.empty(rows, G, dtype=torch.float32, device=w.device)
    zero = torch.empty(rows, G, dtype=torch.float32, device=w.device)
    step = max(1, BLOCK_ELEMS // C)
    for start in range(0, rows, step):
        part = _quantize_rows(flat[start:start + step], bits=bits, group_size=group_size, algorithm=algorithm)
        packed[start:start + step], scale[start:start + step], zero[start:start + step] = (part.packed, part.scale,
                                                                                           part.zero)
    lead = w.shape[:-1]
    return QuantizedTensor(packed.reshape(*lead, -1), scale.reshape(*lead, G), zero.reshape(*lead, G), bits,
                           group_size, C)


def _quantize_rows(w: torch.Tensor, *, bits: int, group_size: int, algorithm: str) -> QuantizedTensor:
    """`quantize` on one block (steps 1-3 of the module docstring, or the symmetric scheme)."""
    C = w.shape[-1]
    if algorithm == "sym":
        codes, scale, zero = quantize_symmetric(w, bits=bits, group_size=group_size)
        return QuantizedTensor(pack(codes, bits), scale, zero, bits, group_size, C)
    G = num_groups(C, group_size)
    qmax = (1 << bits) - 1
    # 1. pad to whole groups
    wg = _pad_cols(w.float(), G * group_size).reshape(*w.shape[:-1], G, group_size)  # [..., G, g]
    # 2. scale and zero per group
    lo, hi = torch.aminmax(wg, dim=-1)  # [..., G]
    scale = (hi - lo) / qmax
    flat = scale <= 0  # a constant group c: s = |c| (or 1), and z puts c on code 1 (c > 0) or 0 (c <= 0)
    scale = torch.where(flat, torch.where(lo != 0, lo.abs(), torch.ones_like(lo)), scale)
    zero = torch.where(flat, (lo < 0).to(lo.dtype), torch.round(-lo / scale))
    if algorithm == "hqq":
        zero = optimize_zero(wg, scale, zero, bits=bits)
    # 3. codes
    q = wg / scale[..., None]  # round(w / s + z) clamped, in place on one temporary (the model can be large)
    q.add_(zero[..., None]).round_().clamp_(0, qmax)
    q = q.reshape(*w.shape[:-1], G * group_size)[..., :C].to(torch.uint8)
    return QuantizedTensor(pack(q, bits), scale, zero, bits, group_size, C)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int, group_size: int,
               cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed [..., P] uint8, scale/zero [..., G] -> w [..., cols] in `dtype` (arithmetic in scale's dtype)."""
    q = unpack_codes(packed, bits, cols)  # [..., C]
    G = scale.shape[-1]
    if G * group_size != cols:
        q = torch.nn.functional.pad(q, (0, G * group_size - cols))
    q = q.reshape(*q.shape[:-1], G, group_size).to(scale.dtype)
    # (q - z) * s as one fused q * s + (-z * s)
    w = torch.addcmul((-zero * scale)[..., None], q, scale[..., None])  # [..., G, g]
    return w.reshape(*w.shape[:-2], G * group_size)[..., :cols].to(dtype)
