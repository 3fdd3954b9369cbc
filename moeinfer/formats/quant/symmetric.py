"""Symmetric group-wise quantization with ggml's rounding: the Q8_0 and Q4_0 block formats of
llama.cpp/GGUF (Gerganov et al., ggml), expressed in moeinfer's group-wise storage.

A group of g consecutive input columns (g = 32 in ggml) has one scale d; w ~ q * d with signed codes.
moeinfer stores unsigned codes and a zero-point, so the same numbers become (u - z) * d with
z = 2^(bits-1) for every group: u = q + 128 (8-bit) or the stored 4-bit code (4-bit, already offset
by 8 in ggml). d is rounded to fp16, as GGUF stores it, and kept in fp32 storage; (u - z) * d is then
exact in fp32, so the dequantized weights equal ggml's bit for bit.

Steps (`quantize_symmetric`), per group of a row:
1. 8-bit (Q8_0): d = max|w| / 127, u = round_half_away(w / d) + 128;
   4-bit (Q4_0): m = the value of largest magnitude (with its sign), d = m / -8,
   u = min(15, trunc(w / d + 8.5));
   codes are computed with 1/d before d is rounded to fp16, as ggml's reference quantizer does;
2. d rounded to fp16 (a group of zeros gets d = 0 and codes at the zero-point).
"""

from __future__ import annotations

import torch

SYMMETRIC_BITS = (4, 8)


@torch.no_grad()
def quantize_symmetric(w: torch.Tensor, *, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """w [..., C] float, C a multiple of group_size -> (codes [..., C] uint8, scale [..., G] fp32,
    zero [..., G] fp32); pack the codes with moeinfer.formats.quant.packing.pack."""
    if bits not in SYMMETRIC_BITS:
        raise ValueError(f"symmetric quantization supports {SYMMETRIC_BITS} bits (Q4_0, Q8_0), got {bits}")
    C = w.shape[-1]
    if C % group_size:
        raise ValueError(f"symmetric quantization needs the column count ({C}) to be a multiple of the "
                         f"group size ({group_size})")
    wg = w.float().reshape(*w.shape[:-1], C // group_size, group_size)  # [..., G, g]
    # 1. scale and codes from the unrounded scale
    if bits == 8:
        d = wg.abs().amax(-1) / 127.0  # [..., G]
    else:
        pos = wg.abs().argmax(-1, keepdim=True)  # first index of the largest magnitude, as ggml's loop
        d = wg.gather(-1, pos).squeeze(-1) / -8.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))[..., None]
    x = wg * inv
    if bits == 8:
        codes = torch.sign(x) * torch.floor(x.abs() + 0.5) + 128.0  # roundf: half away from zero
    else:
        codes = torch.clamp(torch.trunc(x + 8.5), max=15.0)
    zero = torch.full_like(d, float(1 << (bits - 1)))
    # 2. the scale as GGUF stores it
    scale = d.to(torch.float16).float()
    return codes.reshape(w.shape).to(torch.uint8), scale, zero
