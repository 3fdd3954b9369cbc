"""ggml's Q8_0 and Q4_0 blocks <-> moeinfer's symmetric group-32 storage, by moving bits only.

Shapes: [...] leading axes (experts, rows), C columns, B = C / 32 blocks per row.

moeinfer's symmetric scheme (moeinfer.formats.quant.symmetric, `algorithm="sym"`) stores what ggml
stores, in another layout: unsigned codes u with a constant zero-point z = 2^(bits-1), and the
fp16-rounded block scale d kept in fp32, so that w = (u - z) * d. ggml's blocks (ggml-common.h):

    Q8_0, 34 bytes per 32 weights: d fp16 | qs int8[32],  w_j = qs_j * d        (qs = u - 128)
    Q4_0, 18 bytes per 32 weights: d fp16 | qs u8[16],    w_j = (nibble_j - 8) * d
          byte j holds element j in its low nibble and element j + 16 in its high nibble
          (moeinfer's 4-bit packing puts consecutive elements in one byte, low nibble first)

Steps (`to_ggml`; `from_ggml` runs them backwards):
1. unpack moeinfer's codes to one code per element;
2. 8-bit: subtract 128 into int8; 4-bit: pair element j with element j + 16 of the same block;
3. put each block's fp16 scale in front of its code bytes.
"""

from __future__ import annotations

import torch

from moeinfer.formats.quant.packing import pack, unpack

GROUP = 32  # weights per ggml block (QK8_0 = QK4_0 = 32)
BLOCK_BYTES = {8: 2 + GROUP, 4: 2 + GROUP // 2}  # Q8_0, Q4_0
GGML_TYPE_NAMES = {8: "Q8_0", 4: "Q4_0"}


def is_ggml_exact(scale: torch.Tensor, zero: torch.Tensor, *, bits: int, group_size: int) -> bool:
    """True when group-wise codes (scale/zero [..., G]) are a ggml block format bit for bit: group 32,
    the constant zero-point 2^(bits-1), and scales that fp16 holds exactly."""
    if bits not in BLOCK_BYTES or group_size != GROUP:
        return False
    if not bool((zero == float(1 << (bits - 1))).all()):
        return False
    s = scale.float()
    return bool((s.half().float() == s).all())


def to_ggml(packed: torch.Tensor, scale: torch.Tensor, *, bits: int, cols: int) -> torch.Tensor:
    """moeinfer codes packed [..., P] uint8 + scale [..., B] -> ggml blocks [..., B * block bytes] uint8."""
    if cols % GROUP:
        raise ValueError(f"ggml blocks need the column count ({cols}) to be a multiple of {GROUP}")
    lead, nb = packed.shape[:-1], cols // GROUP
    # 1. one code per element, grouped by block
    u = unpack(packed, bits, cols).reshape(*lead, nb, GROUP)  # [..., B, 32] uint8
    # 2. ggml's code bytes
    if bits == 8:
        qs = (u.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)  # [..., B, 32]
    else:
        qs = u[..., : GROUP // 2] | (u[..., GROUP // 2:] << 4)  # [..., B, 16]
    # 3. fp16 scale in front of each block
    d = scale.float().to(torch.float16).contiguous().view(torch.uint8).reshape(*lead, nb, 2)
    return torch.cat([d, qs], dim=-1).reshape(*lead, nb * BLOCK_BYTES[bits])


def from_ggml(blocks: torch.Tensor, *, bits: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml blocks [..., B * block bytes] uint8 -> (moeinfer packed codes [..., P] uint8, scale [..., B] fp32,
    zero [..., B] fp32), ready for moeinfer.formats.quant.groupwise.dequantize with group_size 32."""
    if bits not in BLOCK_BYTES:
        raise ValueError(f"ggml block format for {bits}-bit codes is not supported (8: Q8_0, 4: Q4_0)")
    lead, nb = blocks.shape[:-1], cols // GROUP
    b = blocks.reshape(*lead, nb, BLOCK_BYTES[bits])
    scale = b[..., :2].contiguous().view(torch.float16).reshape(*lead, nb).float()
    qs = b[..., 2:]
    if bits == 8:
        u = (qs.contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)  # [..., B, 32]
    else:
        u = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # elements 0..15, then 16..31
    codes = u.reshape(*lead, cols)
    zero = torch.full_like(scale, float(1 << (bits - 1)))
    return pack(codes, bits), scale, zero
